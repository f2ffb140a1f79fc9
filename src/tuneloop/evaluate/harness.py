"""Baseline vs candidate on the same held-out rows."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset, EvalReport, save_meta
from tuneloop.config import EvalConfig
from tuneloop.evaluate import graders
from tuneloop.evaluate.generate import Generation, generate_answers
from tuneloop.evaluate.report import write_report


def evaluate(
    cfg: EvalConfig, data: Dataset, base: BaseModelRef, adapter: Adapter | None, run_dir: Path
) -> EvalReport:
    """Score the base model (the baseline, same system prompt) and, when given, the fine-tuned adapter
    on the test split. The baseline's answers are reused while the base model, test rows and settings
    are unchanged."""
    out = run_dir / "eval"
    rows = _read_rows(data.test, cfg.max_rows)
    schema = json.loads(data.answer_schema.read_text(encoding="utf-8")) if data.answer_schema else None
    fingerprint = {"base_model": base.name, "test_hash": data.split_hashes["test"], **cfg.model_dump()}
    baseline = _score_cached(out / "baseline", fingerprint, rows, schema, lambda prompts: generate_answers(
        base, None, prompts, cfg.max_new_tokens, cfg.batch_size, "baseline"))
    candidate = None
    if adapter is not None:
        generations = generate_answers(base, adapter.dir, _prompts(rows), cfg.max_new_tokens, cfg.batch_size, "fine-tuned")
        candidate = _score(out / "candidate", rows, generations, schema)
    report_path = write_report(run_dir, rows, baseline, candidate, adapter) if candidate is not None else None
    report = EvalReport(
        dir=out,
        rows=len(rows),
        baseline=baseline["metrics"],
        candidate=None if candidate is None else candidate["metrics"],
        report=report_path,
    )
    save_meta(report, out)
    return report


def _read_rows(path: Path, limit: int | None) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return rows[:limit] if limit else rows


def _prompts(rows: list[dict]) -> list[list[dict[str, str]]]:
    return [row["messages"][:-1] for row in rows]


def _score_cached(directory: Path, fingerprint: dict, rows, schema, generate) -> dict:
    stamp = directory / "fingerprint.json"
    scored = directory / "scored.json"
    if stamp.is_file() and scored.is_file() and json.loads(stamp.read_text()) == fingerprint:
        return json.loads(scored.read_text())
    result = _score(directory, rows, generate(_prompts(rows)), schema)
    stamp.write_text(json.dumps(fingerprint, indent=2, default=str))
    return result


def _score(directory: Path, rows: list[dict], generations: list[Generation], schema: dict | None) -> dict:
    """Grade every answer, write the per-row predictions, and average into metrics."""
    compared_fields = graders.categorical_fields(schema) if schema else None
    per_row = []
    for row, gen in zip(rows, generations):
        reference = row["messages"][-1]["content"]
        grades: dict[str, float] = {
            "json_valid": float(graders.json_valid(gen.text)),
            "exact_match": float(graders.exact_match(gen.text, reference)),
            "rouge_l": graders.rouge_l(gen.text, reference),
        }
        if schema is not None:
            grades["schema_valid"] = float(graders.schema_valid(gen.text, schema))
        fields = graders.field_matches(gen.text, reference, compared_fields)
        if fields:
            grades["field_accuracy"] = mean(map(float, fields.values()))
            grades.update({f"field.{name}": float(ok) for name, ok in fields.items()})
        per_row.append(
            {
                "source": row.get("source"),
                "reference": reference,
                "answer": gen.text,
                "latency_ms": round(gen.latency_ms, 2),
                "completion_tokens": gen.completion_tokens,
                "grades": grades,
            }
        )
    metrics = {name: mean(r["grades"][name] for r in per_row if name in r["grades"]) for name in _grade_names(per_row)}
    metrics["latency_ms"] = mean(r["latency_ms"] for r in per_row)
    result = {"metrics": metrics, "rows": per_row}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "scored.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result


def _grade_names(per_row: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for row in per_row:
        names.update(dict.fromkeys(row["grades"]))
    return list(names)
