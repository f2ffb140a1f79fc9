"""Exported GGUFs read back by an independent reader: a registered version exported by `tuneloop.export` as f16,
q8_0 and q4_0, loaded with transformers' GGUF loader (weights dequantized to fp32, tokenizer from the GGUF too),
answering every held-out test row greedily, against the same version through PEFT (base + adapter, fp32); and,
as the noise floor, the same weights merged in fp32 with no file in between.

    python benchmarks/gguf_readback.py examples/ticket-triage/config.yaml [--version N] [--quants f16,q8_0,q4_0]

Needs a registered version of the config's model and its run's prepared data (`tuneloop run CONFIG` makes both).
No llama.cpp: this isolates what the file's weights and tokenizer do; `gguf_llamacpp.py` runs llama.cpp itself.

Prints a final JSON line with the adapter's schema_valid and closed_fields_accuracy, merged_fp32's
identical_to_adapter and, per quant: same_prompt_tokens (the GGUF's tokenizer encodes every prompt to the
adapter's token ids), the figures of `gguf_llamacpp.compare` (identical_to_adapter, schema_valid,
closed_fields_accuracy against the test rows' references, fields_same_as_adapter), and first_divergence_token
(median index of the first answer token that differs, over the answers that differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from gguf_llamacpp import compare, identical, quality, test_rows


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.config import load_config
    from tuneloop.evaluate.generate import answer_prompts, generate_answers
    from tuneloop.export import export
    from tuneloop.models import load_tokenizer, resolve_base_model
    from tuneloop.registry import find_version, version_dir
    from tuneloop.train.merge import merged_model
    from tuneloop.train.template import prompt_ids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--rows", type=int, default=None, help="default: every test row")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's eval.max_new_tokens")
    parser.add_argument("--quants", default="f16,q8_0,q4_0")
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = load_config(args.config)
    max_tokens = args.max_new_tokens or cfg.eval.max_new_tokens or 128
    prompts, gold, schema = test_rows(cfg, args.rows or 10**9)
    base = resolve_base_model(cfg.base_model, cfg.cache_dir, cfg.trust_remote_code)
    version = find_version(cfg.registry, cfg.model_name, base.name, args.version)
    adapter = version_dir(cfg.registry, version.name, version.version, base_model=base.name)
    batch = cfg.eval.batch_size
    tokenizer = load_tokenizer(base)

    reference = [g.text for g in generate_answers(base, adapter, prompts, max_tokens, batch, "PEFT")]
    reference_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in reference]
    results: dict[str, dict] = {"adapter": quality(reference, gold, schema)}
    with torch.inference_mode():  # the noise floor: the same weights merged, still fp32, no file in between
        merged = [g.text for g in answer_prompts(merged_model(base, adapter).eval(), tokenizer, prompts, max_tokens, batch)]
    results["merged_fp32"] = {"identical_to_adapter": round(sum(identical(merged, reference)) / len(merged), 4)}
    with tempfile.TemporaryDirectory() as scratch, torch.inference_mode():
        for quant in args.quants.split(","):
            folder = export(cfg, "gguf", quant=quant, version=version.version, out=Path(scratch) / quant)
            name = next(folder.glob("*.gguf")).name
            read_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
            started = time.perf_counter()
            texts = [g.text for g in answer_prompts(model, read_tokenizer, prompts, max_tokens, batch)]
            seconds = time.perf_counter() - started
            differing = [(tokenizer(t, add_special_tokens=False)["input_ids"], ids)
                         for t, ids, same in zip(texts, reference_ids, identical(texts, reference)) if not same]
            results[quant] = {
                "file_mb": round((folder / name).stat().st_size / 2**20, 1),
                "same_prompt_tokens": all(prompt_ids(read_tokenizer, p) == prompt_ids(tokenizer, p) for p in prompts),
                **compare(texts, reference, gold, schema),
                "first_divergence_token": statistics.median(_first_difference(a, b) for a, b in differing)
                if differing else None,
                "answer_seconds": round(seconds, 1),
            }
            print(f"{quant}: {results[quant]}", flush=True)
            del model
    print(json.dumps({
        "model": f"{version.name}-v{version.version}",
        "base_model": base.name,
        "rows": len(prompts),
        "max_new_tokens": max_tokens,
        **results,
    }))


if __name__ == "__main__":
    main()
