"""Before training: what the data holds in tokens, what a run will take in time and memory here and on
common GPUs, what it costs against an API, and whether the base model with its prompt is already good
enough (`eval.target`). `plan` writes it all to `plan.json` in the run directory; `run` uses the same
baseline check to stop before training when fine-tuning is not needed."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path

from tuneloop.artifacts import BaseModelRef, Dataset, EvalReport
from tuneloop.config import RunConfig
from tuneloop.errors import TuneloopError
from tuneloop.pipeline.loop import Progress, prepare_data, resolve_base, silent

HOURS_PER_MONTH = 730


class FineTuningNotNeeded(TuneloopError):
    """A baseline already reaches `eval.target` on the validation rows."""

    def __init__(self, verdict: dict, report: EvalReport):
        super().__init__(verdict["reason"])
        self.verdict, self.report = verdict, report


def plan(cfg: RunConfig, progress: Progress = silent) -> dict:
    """The plan of a run of `cfg`, also written to `<run_dir>/plan.json`."""
    from tuneloop.train.estimate import GPUS, ASSUMED_MFU, gpu_seconds, model_shape, peak_memory_mb, probe
    from tuneloop.train.loop import budget_batch_size, total_steps

    base = resolve_base(cfg)
    data, _ = prepare_data(cfg, base, progress)
    tokens = _token_counts(data, base, cfg.train.max_seq_length)
    cfg = cfg.model_copy(update={"train": budget_batch_size(cfg.train, [n for n, _, _ in tokens["train_row_lengths"]])})
    steps = total_steps(cfg.train, data.counts["train"])
    epochs = steps * cfg.train.batch_size * cfg.train.gradient_accumulation / max(1, data.counts["train"])
    shape = model_shape(cfg.train, base)

    probe_steps = probe_size(cfg.plan.probe_steps, steps)
    # The run's peak comes with its longest batch: the probe ends with a step of it.
    longest = tokens.pop("train_row_lengths")[: cfg.train.batch_size]
    # A step runs as rows of at most max_seq_length tokens, one after another: memory follows the largest.
    worst_step, worst_trained = largest_row([(n, t) for n, t, _ in longest], cfg.train.max_seq_length)
    progress(f"probe: {probe_steps} training steps to time this machine, then one of the longest batch for its memory "
             "(thrown away)")
    scratch = Path(tempfile.mkdtemp(prefix="tuneloop-probe-"))
    try:
        measured = probe(cfg.train, data, base, scratch, probe_steps, [line for _, _, line in longest])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    eval_steps = cfg.train.eval_steps or max(1, steps // 4)
    validations = (steps // eval_steps + 1) if data.counts.get("val") else 0
    train_seconds = measured.overhead_seconds + steps * measured.step_seconds + validations * (measured.eval_seconds or 0)

    methods = ("lora", "qlora", "full")

    def memory_of(method: str) -> dict:  # at the longest batch, where the run peaks
        here = None if method == "qlora" else round(peak_memory_mb(  # QLoRA needs a CUDA GPU
            shape, method, worst_step, worst_trained, gpu=False, checkpointing=cfg.train.gradient_checkpointing))
        return {"this machine": here, **{gpu: round(peak_memory_mb(
            shape, method, worst_step, worst_trained, gpu=True, checkpointing=cfg.train.gradient_checkpointing))
            for gpu in GPUS}}

    memory = {method: memory_of(method) for method in methods}
    fits = {gpu: [m for m in methods if memory[m][gpu] <= 0.9 * spec["memory_gb"] * 1024] for gpu, spec in GPUS.items()}
    trained_tokens_total = round(tokens["train_tokens"] * epochs)
    times = {"this machine": round(train_seconds, 1),
             **{gpu: round(gpu_seconds(shape, cfg.train.method, trained_tokens_total, gpu), 4) for gpu in GPUS}}
    result = {
        "rows": {k: data.counts[k] for k in ("train", "val", "test")},
        **tokens,
        "max_seq_length": cfg.train.max_seq_length,
        "steps": steps,
        "epochs": round(epochs, 2),
        "parameters": shape.parameters,
        "trainable_parameters": shape.parameters if cfg.train.method == "full" else shape.trainable_lora,
        "method": cfg.train.method,
        "train_seconds": round(train_seconds, 1),
        "probe": dataclasses.asdict(measured),
        # The probe process's peak RSS: its last step was the run's longest batch, after typical ones.
        "peak_memory_mb": round(measured.peak_rss_mb),
        "memory_mb": memory,
        "fits": fits,
        "train_seconds_by_machine": times,
        "estimates": f"GPU times and memory are estimates: published BF16 peaks at an assumed {ASSUMED_MFU:.0%} "
                     "utilisation, and the parameter/activation formulas of train/estimate.py; this machine's time "
                     "and memory are measured by the probe",
        "costs": _costs(cfg, times, tokens, data),
    }
    verdict = None
    if cfg.eval.target is not None:
        verdict, _ = baseline_verdict(cfg, data, base, progress)
    result["baseline"] = verdict
    result["fine_tune_recommended"] = verdict is None or not verdict["met"]
    (cfg.run_dir / "plan.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def largest_row(batch: list[tuple[int, int]], row_tokens: int) -> tuple[int, int]:
    """(tokens, trained tokens) of the largest row a step of `batch`'s examples (each its tokens and
    trained tokens) runs as, cut at example borders into rows of at most `row_tokens` as training cuts it."""
    rows, current = [], (0, 0)
    for tokens, trained in batch:
        if current[0] and current[0] + tokens > row_tokens:
            rows.append(current)
            current = (0, 0)
        current = (current[0] + tokens, current[1] + trained)
    return max([*rows, current])


def probe_size(configured: int, steps: int) -> int:
    """Steps the probe runs: `plan.probe_steps`, at most 5 % of the run's, and at least 2 (one to warm up,
    one to time), so a run shorter than 40 steps is probed for more than 5 % of its steps."""
    return max(2, min(configured, math.floor(0.05 * steps)))


def baseline_verdict(cfg: RunConfig, data: Dataset, base: BaseModelRef, progress: Progress = silent
                     ) -> tuple[dict, EvalReport]:
    """Score the baselines (zero-shot, and k-shot with `eval.baseline_shots`) on the validation rows, and say
    whether the lower end of one's 95 % interval already reaches `eval.target`."""
    from tuneloop.evaluate import evaluate

    target = cfg.eval.target
    if not data.counts.get("val"):
        raise TuneloopError("eval.target is checked on the validation rows; set data.val_fraction above 0")
    progress(f"scoring the baselines on {data.counts['val']} validation rows against the target "
             f"{target.metric} >= {target.value:g}")
    as_test = dataclasses.replace(data, test=data.val, split_hashes={**data.split_hashes, "test": data.split_hashes["val"]})
    report = evaluate(cfg.eval, as_test, base, None, cfg.run_dir / "baseline_check")
    intervals = {"zero-shot baseline": report.baseline_ci, **report.opponent_ci}
    if not any(target.metric in ci for ci in intervals.values()):
        known = sorted({k for ci in intervals.values() for k in ci})
        raise TuneloopError(f"eval.target.metric {target.metric!r} is not among the scored metrics: {', '.join(known)}")
    scores = {name: ci[target.metric] for name, ci in intervals.items() if target.metric in ci}
    met = [name for name, (low, _high) in scores.items() if low >= target.value]
    if met:
        low, high = scores[met[0]]
        reason = (f"fine-tuning is not needed: the {met[0]} already reaches {target.metric} >= {target.value:g} on "
                  f"{report.rows} validation rows (95 % CI [{low:.3f}, {high:.3f}])")
    else:
        best = max(scores, key=lambda name: scores[name][0])
        reason = (f"fine-tuning is recommended: no baseline reaches {target.metric} >= {target.value:g} with 95 % "
                  f"confidence (best: the {best}, CI [{scores[best][0]:.3f}, {scores[best][1]:.3f}])")
    verdict = {"metric": target.metric, "target": target.value, "intervals": scores, "met": bool(met), "reason": reason}
    return verdict, report


def _token_counts(data: Dataset, base: BaseModelRef, max_length: int) -> dict:
    """Tokens per split as training encodes them, the trained (answer) tokens of the train split, and the
    longest row."""
    from tuneloop.models import load_tokenizer
    from tuneloop.train.template import IGNORE, encode_example

    tokenizer = load_tokenizer(base)
    counts, longest, trained, prompt_tokens, answer_tokens, train_rows = {}, 0, 0, [], [], []
    for split in ("train", "val", "test"):
        total = 0
        for line in getattr(data, split).read_text(encoding="utf-8").splitlines():
            messages = json.loads(line)["messages"]
            example = encode_example(tokenizer, messages, max_length=1 << 30)
            total += len(example.input_ids)
            longest = max(longest, len(example.input_ids))
            answer = sum(label != IGNORE for label in example.labels)
            if split == "train":
                trained += answer
                train_rows.append((len(example.input_ids), answer, line))
            if split == "test":
                prompt_tokens.append(len(example.input_ids) - answer)
                answer_tokens.append(answer)
        counts[f"{split}_tokens"] = total
    return {**counts, "trained_tokens": trained, "longest_row_tokens": longest,
            "train_row_lengths": sorted(train_rows, reverse=True),
            "mean_prompt_tokens": round(sum(prompt_tokens) / max(1, len(prompt_tokens)), 1),
            "mean_answer_tokens": round(sum(answer_tokens) / max(1, len(answer_tokens)), 1)}


def _costs(cfg: RunConfig, times: dict[str, float], tokens: dict, data: Dataset) -> dict:
    """Training cost per machine; with a monthly volume, self-hosting against the API, and the break-even."""
    prices = cfg.plan.gpu_prices
    training = {machine: round(seconds / 3600 * prices[machine], 4) for machine, seconds in times.items()
                if machine in prices}
    costs: dict = {"training_usd": training}
    volume = cfg.plan.requests_per_month
    if volume is None:
        return costs
    tokens_in = cfg.plan.prompt_tokens or tokens["mean_prompt_tokens"]
    tokens_out = cfg.plan.completion_tokens or tokens["mean_answer_tokens"]
    if cfg.plan.serving_machine not in prices:
        raise TuneloopError(f"plan.serving_machine {cfg.plan.serving_machine!r} has no price in plan.gpu_prices")
    capacity = cfg.plan.serving_tokens_per_second * 3600 * HOURS_PER_MONTH  # tokens out per machine-month
    machines = max(1, math.ceil(volume * tokens_out / capacity))
    self_hosting = machines * HOURS_PER_MONTH * prices[cfg.plan.serving_machine]
    costs.update({"requests_per_month": volume, "tokens_in": tokens_in, "tokens_out": tokens_out,
                  "serving_machines": machines, "self_hosting_usd_per_month": round(self_hosting, 2)})
    if cfg.plan.api_price_in is None or cfg.plan.api_price_out is None:
        return costs
    api = volume * (tokens_in * cfg.plan.api_price_in + tokens_out * cfg.plan.api_price_out) / 1e6
    train_cost = training.get("this machine", min(training.values()))
    saving = api - self_hosting
    costs.update({"api_usd_per_month": round(api, 2),
                  "break_even_months": round(train_cost / saving, 2) if saving > 0 else "never"})
    return costs
