"""A Llama-family model as one GGUF file, written with the `gguf` package in the layout llama.cpp's own
converter (convert_hf_to_gguf.py) produces, so that llama.cpp, Ollama and transformers' GGUF loader read it.

Only what this writer knows to get right is accepted: LlamaForCausalLM with default or linear RoPE and a
byte-level BPE tokenizer. Anything else fails before a byte is written, naming the converter that does more.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tuneloop.errors import TuneloopError

Quant = Literal["f16", "q8_0", "q4_0"]
CONVERTER = "llama.cpp's convert_hf_to_gguf.py on a `--format merged` export"
SUPPORTED_ARCHITECTURE = "LlamaForCausalLM"

# tokenizer.ggml.token_type values (llama.cpp's vocabulary token kinds)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def check_supported(config) -> None:
    """Raise unless this writer can convert a model with this transformers config."""
    architectures = list(getattr(config, "architectures", None) or [getattr(config, "model_type", "unknown")])
    if architectures != [SUPPORTED_ARCHITECTURE]:
        raise TuneloopError(
            f"GGUF export supports the Llama architecture family ({SUPPORTED_ARCHITECTURE}), not "
            f"{', '.join(architectures)}; convert it with {CONVERTER}"
        )
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise TuneloopError(f"GGUF export: RoPE scaling {rope_type!r} is not supported here; convert with {CONVERTER}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise TuneloopError(f"GGUF export: Llama with bias terms is not supported here; convert with {CONVERTER}")


def write_gguf(model, tokenizer, path: Path, quant: Quant, general: dict[str, Any]) -> None:
    """Write `model` (a merged LlamaForCausalLM) and its tokenizer to `path`, its matrices in `quant`;
    `general` holds the general.* provenance keys (name, basename, finetune, organization, size_label,
    license, languages) that are known."""
    import gguf

    check_supported(model.config)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    # 1. provenance, 2. hyperparameters, 3. tokenizer, 4. tensors; then header, key-values and data in that order
    writer.add_type(gguf.GGUFType.MODEL)
    _add_general(writer, general)
    _add_hyperparameters(writer, model.config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, model.config.vocab_size)
    _add_tensors(writer, model, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_general(writer, general: dict[str, Any]) -> None:
    for key in ("name", "organization", "finetune", "basename", "size_label", "license"):
        if general.get(key):
            getattr(writer, f"add_{key}")(str(general[key]))
    if general.get("languages"):
        writer.add_languages(list(general["languages"]))


def _rope(config) -> dict[str, Any]:
    """RoPE settings; transformers 5 keeps them in `rope_parameters`, older configs in rope_theta/rope_scaling."""
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in parameters and getattr(config, "rope_theta", None) is not None:
        parameters["rope_theta"] = config.rope_theta
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling and "rope_type" not in parameters:
        parameters.update(rope_type=scaling.get("rope_type", scaling.get("type")), factor=scaling.get("factor"))
    return parameters


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hyperparameters(writer, config) -> None:
    import gguf

    rope = _rope(config)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(_head_dim(config))
    if _head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The vocabulary as llama.cpp's "gpt2" (byte-level BPE) tokenizer model: tokens by id with their kinds,
    merges, the pre-tokenizer llama.cpp should split text with, special ids and the chat template."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise TuneloopError(
            f"GGUF export supports byte-level BPE tokenizers only (this one: {model.get('type')}); convert with {CONVERTER}"
        )
    pre, add_prefix_space = _pre_tokenizer(spec.get("pre_tokenizer") or {})
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, kinds = [], []
    for index in range(vocab_size):
        if index not in by_id:  # the embedding matrix can be larger than the vocabulary
            tokens.append(f"[PAD{index}]")
            kinds.append(UNUSED)
            continue
        tokens.append(by_id[index])
        kinds.append((CONTROL if added[index].special else USER_DEFINED) if index in added else NORMAL)
    # A merge is one string "left right"; a space inside a part (possible in the list form) is stored shifted
    # by 256 code points, as llama.cpp reads it back.
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", chr(ord(" ") + 256)) for p in m)
              for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_space_prefix(add_prefix_space)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(spec: dict[str, Any]) -> tuple[str, bool]:
    """llama.cpp's name for the way this tokenizer splits text before BPE, and whether it adds a leading space.

    Recognised by structure: GPT-2's byte-level regex alone is llama.cpp's "gpt-2"; digits split one by one
    before it is "smollm" (SmolLM's original tokenizer). The bundled SmolLM2, rebuilt from its GGUF by
    transformers, has the plain byte-level form; its vocabulary has no multi-digit token, so both split
    numbers into single digits alike."""
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") for step in steps]
    last = steps[-1] if steps else {}
    if last.get("type") == "ByteLevel" and last.get("use_regex", True):
        if kinds == ["ByteLevel"]:
            return "gpt-2", bool(last.get("add_prefix_space", False))
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return "smollm", bool(last.get("add_prefix_space", False))
    raise TuneloopError(
        f"GGUF export: pre-tokenizer {' + '.join(map(str, kinds)) or 'none'} is not one this writer can name for "
        f"llama.cpp; convert with {CONVERTER}"
    )


def _add_tensors(writer, model, quant: Quant) -> None:
    import gguf
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # The matrix that produces the logits: its own output.weight, or the token embedding when tied (llama.cpp
    # then writes no output.weight and reuses token_embd).
    logits_matrix = "token_embd.weight" if tied else "output.weight"
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TuneloopError(f"GGUF export: no GGUF name for tensor {hf_name}; convert with {CONVERTER}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _interleave_rope_halves(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _interleave_rope_halves(data, config.num_key_value_heads or config.num_attention_heads)
        encoded, qtype = _encode(data, _tensor_type(name, data, quant, logits_matrix))
        writer.add_tensor(name, encoded, raw_dtype=qtype)


def _encode(data: np.ndarray, qtype):
    """`data` in `qtype`, or in f16 where the block size does not divide its rows, as llama.cpp's converter does."""
    import gguf

    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def _tensor_type(name: str, data: np.ndarray, quant: Quant, logits_matrix: str):
    """Norms and other vectors stay f32 (llama.cpp computes them in f32). With q4_0, the logits matrix gets
    q8_0: llama.cpp's quantizer keeps that one matrix at higher precision too (q6_K, or q8_0 where rows do not
    fit q6_K's 256-wide blocks, as with SmolLM2); this package cannot encode q6_K."""
    from gguf import GGMLQuantizationType as T

    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return T.F32
    if quant == "q4_0":
        return T.Q8_0 if name == logits_matrix else T.Q4_0
    return {"f16": T.F16, "q8_0": T.Q8_0}[quant]


def _interleave_rope_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection for llama.cpp's rotary embedding.

    transformers rotates the first half of each head's dimensions against the second half; llama.cpp rotates
    adjacent pairs (0,1), (2,3), ... So row i of a head's first half and row i of its second half become rows
    2i and 2i+1."""
    rows = weight.shape[0]
    head_dim = rows // heads
    # (heads, 2 halves, head_dim/2, in) -> (heads, head_dim/2, 2 halves, in) -> back to (rows, in)
    return weight.reshape(heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(weight.shape)
