"""What a training run will need, before it runs: trainable parameters, peak memory per method from the
parameter count and activation formulas, time on common GPUs from their published peak throughput, and a
short probe of real steps on this machine (the measured figures `tuneloop plan` trusts most)."""

from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path

from tuneloop.artifacts import BaseModelRef, Dataset
from tuneloop.config import TrainConfig

# Published dense BF16 tensor-core peaks (NVIDIA data sheets: L4, A100, H100 SXM), one common card per memory size.
GPUS = {
    "L4 24GB": {"memory_gb": 24, "bf16_tflops": 121.0},
    "A100 40GB": {"memory_gb": 40, "bf16_tflops": 312.0},
    "H100 80GB": {"memory_gb": 80, "bf16_tflops": 989.0},
}
# Share of that peak a small-model fine-tune reaches (model FLOPs utilisation): an assumption, stated with
# every GPU estimate. Small models with short rows reach little of a large GPU's peak.
ASSUMED_MFU = 0.15
GPU_RUNTIME_MB = 600  # CUDA context and allocator reserve, beside the tensors


@dataclasses.dataclass(frozen=True)
class ModelShape:
    parameters: int
    trainable_lora: int  # the adapter's parameters under train.lora_r / target_modules
    layers: int
    hidden: int
    intermediate: int
    vocab: int


def model_shape(cfg: TrainConfig, base: BaseModelRef) -> ModelShape:
    """Parameter counts and sizes, from the model built on the meta device (no weights are loaded)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneloop.train.loop import lora_config

    config = AutoConfig.from_pretrained(base.path, trust_remote_code=base.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=base.trust_remote_code)
    parameters = sum(p.numel() for p in model.parameters())
    adapted = get_peft_model(model, lora_config(cfg))
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(parameters, trainable, text.num_hidden_layers, text.hidden_size,
                      getattr(text, "intermediate_size", 4 * text.hidden_size), text.vocab_size)


def peak_memory_mb(shape: ModelShape, method: str, tokens_per_step: int, trained_per_step: int, gpu: bool,
                   checkpointing: bool = False) -> float:
    """Tensor memory of one training step: weights, the trained parameters with their gradients and AdamW's
    two moments, the activations kept for the backward pass and the logits of the trained positions."""
    value_bytes = 2 if gpu else 4  # bf16 on a GPU, fp32 on a CPU
    weights = {"qlora": 0.55 * shape.parameters, "lora": value_bytes * shape.parameters,
               "dpo": value_bytes * shape.parameters, "full": 4 * shape.parameters}[method]
    trained = (shape.parameters if method == "full" else shape.trainable_lora) * (4 + 4 + 8)  # fp32 + grad + 2 moments
    # Per token and layer: the inputs of attention and MLP, q/k/v, attention output, and the MLP's three
    # intermediate tensors (Korthikanti et al. 2022, without the attention matrix: SDPA does not keep it).
    per_token_layer = (10 * shape.hidden + 3 * shape.intermediate) * value_bytes
    layers_kept = 1 if checkpointing else shape.layers
    activations = tokens_per_step * (per_token_layer * layers_kept + shape.hidden * value_bytes * shape.layers)
    logits = trained_per_step * shape.vocab * 4 * 2  # fp32 logits and their softmax gradient
    if method == "dpo":  # chosen and rejected each go through the policy and the reference
        activations, logits = 2 * activations, 2 * logits
    return (weights + trained + activations + logits) / 2**20 + (GPU_RUNTIME_MB if gpu else 0)


def gpu_seconds(shape: ModelShape, method: str, tokens: int, gpu: str) -> float:
    """Estimated training seconds on `gpu`: 6 FLOPs per parameter and token for a full fine-tune, 4 when the
    base is frozen (no weight gradients), at ASSUMED_MFU of the card's published BF16 peak."""
    flops_per_token = (6 if method == "full" else 4) * shape.parameters * (2 if method == "dpo" else 1)
    slowdown = 1.3 if method == "qlora" else 1.0  # 4-bit weights are dequantized at every matmul
    return tokens * flops_per_token * slowdown / (GPUS[gpu]["bf16_tflops"] * 1e12 * ASSUMED_MFU)


@dataclasses.dataclass(frozen=True)
class Probe:
    steps: int
    step_seconds: float  # a training step after the first
    eval_seconds: float | None  # one validation-loss pass (None: no validation split)
    overhead_seconds: float  # what the trainer spends outside steps and validations (setup, first step's warm-up)
    peak_rss_mb: float  # the process's peak resident memory once the probe has run


def probe(cfg: TrainConfig, data: Dataset, base: BaseModelRef, scratch: Path, steps: int,
          peak_rows: list[str]) -> Probe:
    """Run `steps` real training steps (with one validation pass) of `cfg` into `scratch`, and time them;
    then one step of `peak_rows` (the run's longest batch, as JSONL lines) for the peak memory. That step
    comes after the typical ones as in a real run: the allocator does not give a longer step the freed
    buffers of shorter ones, so the longest batch alone would read low (benchmarks/RESULTS.md)."""
    from tuneloop.train import train

    stamps: list[tuple[int, str, float]] = []

    def on_log(step: int, total: int, logs: dict) -> None:
        stamps.append((step, "eval" if "eval_loss" in logs else "train" if "loss" in logs else "other",
                       time.perf_counter()))

    has_val = bool(data.counts.get("val"))
    probe_cfg = cfg.model_copy(update={
        "max_steps": steps, "eval_steps": max(1, steps - 1) if has_val else None, "save_steps": 10**9,
        "early_stopping_patience": None, "distributed": "none", "num_processes": None,
    })
    adapter = train(probe_cfg, data, base, scratch, on_log=on_log)
    trains = [t for step, kind, t in stamps if kind == "train"]
    evals = [(step, t) for step, kind, t in stamps if kind == "eval"]
    intervals = [b - a for a, b in zip(trains, trains[1:])]
    eval_seconds = None
    if evals:
        step, at = evals[0]
        before = max(t for s, kind, t in stamps if kind == "train" and s <= step)
        eval_seconds = at - before
        # The interval that holds the validation pass is not a step's time.
        intervals = [b - a for a, b in zip(trains, trains[1:]) if not (a <= at <= b)] or intervals
    step_seconds = sorted(intervals)[len(intervals) // 2] if intervals else adapter.train_seconds / steps
    counted = step_seconds * (steps - 1) + (eval_seconds or 0.0) * len(evals)
    rows = scratch / "longest-batch.jsonl"
    rows.write_text("".join(line + "\n" for line in peak_rows), encoding="utf-8")
    longest = dataclasses.replace(data, train=rows, counts={**data.counts, "train": len(peak_rows), "val": 0})
    train(probe_cfg.model_copy(update={"max_steps": 1, "eval_steps": None}), longest, base, scratch / "peak")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return Probe(steps, step_seconds, eval_seconds, max(0.0, adapter.train_seconds - counted), peak)
