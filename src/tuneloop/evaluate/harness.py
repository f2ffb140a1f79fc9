"""Baseline vs candidate on the same held-out rows, with confidence intervals and the promotion gate."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from statistics import mean
from typing import Callable

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset, EvalReport, save_meta
from tuneloop.config import EvalConfig
from tuneloop.evaluate import metrics as metric_set
from tuneloop.evaluate.gate import decide
from tuneloop.evaluate.generate import Generation, generate_answers
from tuneloop.evaluate.eval_report import write_eval_report
from tuneloop.evaluate.report import write_report
from tuneloop.evaluate.stats import bootstrap, flips


def evaluate(
    cfg: EvalConfig, data: Dataset, base: BaseModelRef, adapter: Adapter | None, run_dir: Path
) -> EvalReport:
    """Score the base model (the baseline, same system prompt) and, when given, the fine-tuned adapter
    on the test split; with a candidate, decide the promotion gate and write the reports. The baseline's
    answers are reused while the base model, test rows and generation settings are unchanged."""
    out = run_dir / "eval"
    rows = _read_rows(data.test, cfg.max_rows)
    fingerprint = {
        "base_model": base.name,
        "test_hash": data.split_hashes["test"],
        **cfg.model_dump(include={"max_new_tokens", "batch_size", "max_rows"}),
    }
    baseline = _generate_cached(out / "baseline", fingerprint, lambda prompts: generate_answers(
        base, None, prompts, cfg.max_new_tokens, cfg.batch_size, "baseline"), rows)
    candidate = None
    if adapter is not None:
        candidate = generate_answers(base, adapter.dir, _prompts(rows), cfg.max_new_tokens, cfg.batch_size, "fine-tuned")
    return compare(cfg, data, rows, baseline, candidate, run_dir, adapter)


def compare(
    cfg: EvalConfig,
    data: Dataset,
    rows: list[dict],
    baseline: list[Generation],
    candidate: list[Generation] | None,
    run_dir: Path,
    adapter: Adapter | None = None,
) -> EvalReport:
    """Grade the answers of both models, bootstrap the intervals, decide the gate, write the reports."""
    out = run_dir / "eval"
    schema = json.loads(data.answer_schema.read_text(encoding="utf-8")) if data.answer_schema else None
    specs = cfg.metrics or metric_set.default_metrics(schema)
    gated = metric_set.gate_keys(specs, schema)
    references = [row["messages"][-1]["content"] for row in rows]

    # 1. Grade each side and keep its per-row answers and scores on disk.
    base_graded = metric_set.grade(specs, references, [g.text for g in baseline], schema)
    sides = {"baseline": _save_side(out / "baseline", rows, baseline, base_graded)}
    cand_graded = None
    if candidate is not None:
        cand_graded = metric_set.grade(specs, references, [g.text for g in candidate], schema)
        sides["candidate"] = _save_side(out / "candidate", rows, candidate, cand_graded)

    # 2. Paired bootstrap: the same resampled rows for both sides.
    base_ci, cand_ci, difference = bootstrap(
        base_graded.statistics, None if cand_graded is None else cand_graded.statistics, cfg.bootstrap_resamples, cfg.seed
    )

    # 3. The gate. The production version joins "baseline" here as a second opponent once the registry
    #    can hand over its answers on the same rows.
    failures = None if difference is None else decide(gated, {"baseline": difference})
    report = EvalReport(
        dir=out,
        rows=len(rows),
        baseline=sides["baseline"]["metrics"],
        candidate=sides["candidate"]["metrics"] if "candidate" in sides else None,
        baseline_ci=base_ci,
        candidate_ci=cand_ci,
        difference=difference,
        flips=None if cand_graded is None else _flips(base_graded.per_row, cand_graded.per_row),
        gate_metrics=gated,
        gate_passed=None if failures is None else not failures,
        gate_failures=failures or [],
    )
    if cand_graded is not None:
        summary = write_report(run_dir, rows, sides, report, adapter)
        full = write_eval_report(run_dir, sides, report)
        report = dataclasses.replace(report, report=summary, html_report=full)
    save_meta(report, out)
    return report


def _read_rows(path: Path, limit: int | None) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return rows[:limit] if limit else rows


def _prompts(rows: list[dict]) -> list[list[dict[str, str]]]:
    return [row["messages"][:-1] for row in rows]


def _generate_cached(
    directory: Path, fingerprint: dict, generate: Callable[[list], list[Generation]], rows: list[dict]
) -> list[Generation]:
    stamp, saved = directory / "fingerprint.json", directory / "generations.json"
    if stamp.is_file() and saved.is_file() and json.loads(stamp.read_text()) == fingerprint:
        return [Generation(**g) for g in json.loads(saved.read_text())]
    generations = generate(_prompts(rows))
    directory.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps([dataclasses.asdict(g) for g in generations], ensure_ascii=False))
    stamp.write_text(json.dumps(fingerprint, indent=2, default=str))
    return generations


def _save_side(directory: Path, rows: list[dict], generations: list[Generation], graded: metric_set.Graded) -> dict:
    """Per-row answers with their grades, and the metrics, as scored.json."""
    per_row = [
        {
            "source": row.get("source"),
            "reference": row["messages"][-1]["content"],
            "answer": gen.text,
            "latency_ms": round(gen.latency_ms, 2),
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens,
            "grades": {name: scores[i] for name, scores in graded.per_row.items() if scores[i] is not None},
        }
        for i, (row, gen) in enumerate(zip(rows, generations))
    ]
    metrics = {**graded.metrics, "latency_ms": mean(g.latency_ms for g in generations) if generations else 0.0}
    result = {"metrics": metrics, "rows": per_row, "classification": graded.classification}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "scored.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result


def _flips(baseline: dict[str, list], candidate: dict[str, list]) -> dict[str, dict[str, list[int]]]:
    """Fixed and broken rows for every pass/fail metric (per-row scores of 0 or 1 only)."""
    binary = [m for m, s in baseline.items() if m in candidate and all(v in (0.0, 1.0, None) for v in s + candidate[m])]
    return {m: flips(baseline[m], candidate[m]) for m in binary}
