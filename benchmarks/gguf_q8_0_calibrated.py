"""Could a better rounding onto q8_0's grid make a q8_0 export answer like the adapter? Plain round-to-nearest
(what the gguf package and llama.cpp's converter do) against GPTQ (Frantar et al. 2022: each weight column is
rounded in turn and its error spread over the columns not yet rounded, weighted by the layer's input statistics
from calibration rows), both onto the same grid: one fp16 scale per 32 weights of a row, 8-bit integers, so a
GPTQ result is an ordinary q8_0 file. Simulated in fp32 (the rounded weights put back into the merged model),
which is what transformers' GGUF loader reads back.

    python benchmarks/gguf_q8_0_calibrated.py examples/ticket-triage/config.yaml [--calib-rows 128] [--damp 0.01]

GPTQ runs layer by layer: each decoder layer's linear layers in the order their inputs are computed (q/k/v,
o, gate/up, down), each from calibration inputs that went through the already-rounded layers before it. The
calibration rows are the run's first training rows (prompt and answer); the tied embedding is rounded to nearest.
Needs a registered version and its run's data (`tuneloop run CONFIG`).

Prints a final JSON line with, per split (val, test), the answers identical to the fp32 merged model's for
round_to_nearest and gptq, and gptq's seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

BLOCK = 32  # q8_0: one scale per 32 weights along a row


def scales(blocks: torch.Tensor) -> torch.Tensor:
    """q8_0's scale of each block along the last dimension: its largest magnitude / 127, stored in fp16."""
    return (blocks.abs().amax(-1, keepdim=True) / 127).half().float()


def on_grid(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`values` rounded to the nearest multiple of `scale` an 8-bit integer reaches."""
    return torch.round(values / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp(-128, 127) * scale


def round_to_nearest(weight: torch.Tensor) -> torch.Tensor:
    """q8_0 as the gguf package encodes it, dequantized."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // BLOCK, BLOCK)
    return on_grid(blocks, scales(blocks)).reshape(rows, cols)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """`weight` rounded column by column onto the q8_0 grid, each column's error pushed onto the later columns
    through the inverse of `hessian` (the mean of x x^T over the layer's calibration inputs)."""
    weight = weight.clone().float()
    cols = weight.shape[1]
    hessian = hessian.double() + damp * hessian.diagonal().mean().double() * torch.eye(cols, dtype=torch.float64)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    upper = torch.linalg.cholesky(inverse, upper=True).float()
    rounded = torch.zeros_like(weight)
    for start in range(0, cols, BLOCK):
        block = weight[:, start : start + BLOCK].clone()
        scale = scales(block)[:, 0]
        local = upper[start : start + BLOCK, start : start + BLOCK]
        errors = torch.zeros_like(block)
        for i in range(BLOCK):
            column = block[:, i]
            rounded[:, start + i] = on_grid(column, scale)
            errors[:, i] = (column - rounded[:, start + i]) / local[i, i]
            block[:, i:] -= errors[:, i : i + 1] * local[i, i:]
        weight[:, start + BLOCK :] -= errors @ upper[start : start + BLOCK, start + BLOCK :]
    return rounded


class _Captured(Exception):
    pass


def first_layer_inputs(model, token_ids: list[list[int]]) -> list[tuple[torch.Tensor, dict]]:
    """Each calibration row's hidden states entering the first decoder layer, with the keyword arguments
    (mask, rotary embeddings, positions) the model passes every layer."""
    captured = []

    def grab(module, args, kwargs):
        keep = ("attention_mask", "position_embeddings", "position_ids")
        captured.append((args[0], {k: kwargs[k] for k in keep}))
        raise _Captured

    hook = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in token_ids:
            try:
                model(torch.tensor([ids]))
            except _Captured:
                pass
    finally:
        hook.remove()
    return captured


def gptq_model(model, token_ids: list[list[int]], damp: float) -> None:
    """Round every decoder layer's linear weights in place with GPTQ, layer by layer, and the tied embedding to
    nearest."""
    order = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
             ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    inputs = first_layer_inputs(model, token_ids)
    for layer in model.model.layers:
        modules = dict(layer.named_modules())
        for group in order:
            sums = {name: torch.zeros(modules[name].in_features, modules[name].in_features) for name in group}
            counts = {name: 0 for name in group}

            def accumulate(name):
                def hook(module, args, output):
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    sums[name] += x.T @ x
                    counts[name] += x.shape[0]
                return hook

            hooks = [modules[name].register_forward_hook(accumulate(name)) for name in group]
            for hidden, kwargs in inputs:
                layer(hidden, **kwargs)
            for hook in hooks:
                hook.remove()
            for name in group:
                modules[name].weight.copy_(gptq(modules[name].weight, sums[name] / counts[name], damp))
        inputs = [(layer(hidden, **kwargs), kwargs) for hidden, kwargs in inputs]
    embedding = model.model.embed_tokens.weight
    embedding.copy_(round_to_nearest(embedding))


def main() -> None:
    from tuneloop.artifacts import Dataset, load_meta
    from tuneloop.config import load_config
    from tuneloop.evaluate.generate import answer_prompts
    from tuneloop.models import load_tokenizer, resolve_base_model
    from tuneloop.registry import find_version, version_dir
    from tuneloop.train.merge import merged_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--calib-rows", type=int, default=128)
    parser.add_argument("--damp", type=float, default=0.01, help="added to the Hessian's diagonal, times its mean")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = load_config(args.config)
    data = load_meta(Dataset, cfg.run_dir / "data", "data CONFIG")
    chats = {split: [json.loads(line)["messages"] for line in getattr(data, split).read_text().splitlines()]
             for split in ("train", "val", "test")}
    base = resolve_base_model(cfg.base_model, cfg.cache_dir, cfg.trust_remote_code)
    version = find_version(cfg.registry, cfg.model_name, base.name, args.version)
    model = merged_model(base, version_dir(cfg.registry, version.name, version.version, base_model=base.name)).float()
    tokenizer = load_tokenizer(base)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def answers() -> dict[str, list[str]]:
        return {split: [g.text for g in answer_prompts(model, tokenizer, [c[:-1] for c in chats[split]],
                                                        args.max_new_tokens, cfg.eval.batch_size)]
                for split in ("val", "test")}

    def identical(got: dict[str, list[str]]) -> dict[str, str]:
        return {split: f"{sum(a == b for a, b in zip(got[split], reference[split]))}/{len(got[split])}"
                for split in got}

    with torch.inference_mode():
        reference = answers()
        for name, tensor in model.named_parameters():
            if tensor.dim() == 2:
                tensor.copy_(round_to_nearest(original[name]))
        nearest = identical(answers())
        print(f"round to nearest: {nearest}", flush=True)
        model.load_state_dict(original)
        calibration = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
                       for c in chats["train"][: args.calib_rows]]
        started = time.perf_counter()
        gptq_model(model, calibration, args.damp)
        seconds = time.perf_counter() - started
        calibrated = identical(answers())
        print(f"gptq: {calibrated}", flush=True)
    print(json.dumps({
        "model": f"{version.name}-v{version.version}",
        "calib_rows": len(calibration),
        "damp": args.damp,
        "max_new_tokens": args.max_new_tokens,
        "identical_to_fp32": {"round_to_nearest": nearest, "gptq": calibrated},
        "gptq_s": round(seconds, 1),
    }))


if __name__ == "__main__":
    main()
