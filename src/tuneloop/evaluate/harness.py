"""Baseline(s) vs candidate on the same held-out rows, with confidence intervals and the promotion gate."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from statistics import mean
from typing import Callable

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset, EvalReport, save_meta
from tuneloop.config import EvalConfig
from tuneloop.errors import TuneloopError
from tuneloop.evaluate import endpoint
from tuneloop.evaluate import metrics as metric_set
from tuneloop.evaluate.endpoint import Endpoint
from tuneloop.evaluate.eval_report import write_eval_report
from tuneloop.evaluate.gate import decide
from tuneloop.evaluate.generate import Generation, answer_budget, generate_answers, model_kind
from tuneloop.evaluate.graders import embedding_model_dir
from tuneloop.evaluate.judge import Judge, compare_answers, normalised, score_answers
from tuneloop.evaluate.preference import has_pairs, preference_wins
from tuneloop.evaluate.report import write_report
from tuneloop.evaluate.shots import draw_shots, with_shots
from tuneloop.evaluate.stats import bootstrap, flips


Model = Path | Endpoint  # an adapter or full model directory, or an OpenAI-compatible endpoint
REPORT_FILES = ("report.md", "metrics.png", "eval_report.md", "eval_report.html")  # written with a candidate


def evaluate(
    cfg: EvalConfig,
    data: Dataset,
    base: BaseModelRef,
    adapter: Adapter | None,
    run_dir: Path,
    model: Model | None = None,
    production: Path | None = None,
    judge: Judge | None = None,
    candidate_name: str | None = None,
) -> EvalReport:
    """Score the base model (the baseline, same system prompt; with `baseline_shots`, also a few-shot
    baseline) and, when given, a candidate on the test split: `model` (an adapter or full model directory,
    or an endpoint), else the run's `adapter`. With a candidate, the production version's adapter
    (`production`) joins the baselines as an opponent; the gate is decided and the reports written, naming
    the candidate `candidate_name` (default: "fine-tuned" for the run's adapter, else what `model` is).
    Baseline answers are reused while the base model, test rows and generation settings are unchanged."""
    out = run_dir / "eval"
    if cfg.max_new_tokens is None:
        from tuneloop.models import load_tokenizer

        cfg = cfg.model_copy(update={"max_new_tokens": answer_budget(load_tokenizer(base), data.train)})
    target = model if model is not None else (adapter.dir if adapter is not None else None)
    for directory in (target, production):
        if isinstance(directory, Path):
            model_kind(directory)  # fail before any generation
    if any(m.name == "embedding_similarity" for m in cfg.metrics):
        embedding_model_dir()  # likewise
    rows = _read_rows(data.test, cfg.max_rows)
    prompts = _prompts(rows)
    fingerprint = {
        "base_model": base.name,
        "test_hash": data.split_hashes["test"],
        **cfg.model_dump(include={"max_new_tokens", "batch_size", "max_rows"}),
    }
    baseline = _generate_cached(out / "baseline", fingerprint, _local(cfg, base, None, "baseline"), prompts)
    opponents = _few_shot_baseline(cfg, data, base, prompts, fingerprint, out)
    candidate = None
    if target is not None:
        if production is not None:
            opponents["production"] = _local(cfg, base, production, "production")(prompts)
        if isinstance(target, Endpoint):
            candidate = endpoint.generate_answers(target, prompts, cfg.max_new_tokens, "candidate")
        else:
            candidate = _local(cfg, base, target, "candidate")(prompts)
    preferences = _preferences(cfg, base, rows, target, production)
    if isinstance(target, Endpoint):
        source, default_name = f"{target.model} at {target.base_url}", f"{target.model} (endpoint)"
    else:
        source = None if target is None else str(target.resolve())
        default_name = "fine-tuned" if model is None or target is None else target.name
    return compare(cfg, data, rows, baseline, candidate, run_dir, adapter if model is None else None, opponents, judge,
                   candidate_name or default_name, source, preferences)


def _preferences(cfg: EvalConfig, base: BaseModelRef, rows: list[dict], target: Model | None,
                 production: Path | None) -> dict[str, list[float]]:
    """Preference accuracy per side (baseline, candidate, production) when the test rows are preference pairs;
    an endpoint gives no likelihoods and gets none."""
    if not has_pairs(rows):
        if any(m.name == "preference_accuracy" for m in cfg.metrics):
            raise TuneloopError("metric preference_accuracy needs preference pairs (a rejected answer) in every test row")
        return {}
    sides = {"baseline": None, "candidate": target, "production": production}
    return {side: preference_wins(base, directory, rows) for side, directory in sides.items()
            if side == "baseline" or isinstance(directory, Path)}


def _local(cfg: EvalConfig, base: BaseModelRef, model_dir: Path | None, label: str) -> Callable[[list], list[Generation]]:
    return lambda prompts: generate_answers(base, model_dir, prompts, cfg.max_new_tokens, cfg.batch_size, label)


def _few_shot_baseline(
    cfg: EvalConfig, data: Dataset, base: BaseModelRef, prompts: list, fingerprint: dict, out: Path
) -> dict[str, list[Generation]]:
    if not cfg.baseline_shots:
        return {}
    name = f"{cfg.baseline_shots}-shot baseline"
    shots = draw_shots(data.train, cfg.baseline_shots, cfg.seed)
    directory = out / _slug(name)
    stamp = {**fingerprint, "shots": shots, "train_hash": data.split_hashes.get("train")}
    generate = _local(cfg, base, None, name)
    answers = _generate_cached(directory, stamp, generate, [with_shots(p, shots) for p in prompts])
    (directory / "shots.json").write_text(json.dumps(shots, indent=2, ensure_ascii=False), encoding="utf-8")
    return {name: answers}


def compare(
    cfg: EvalConfig,
    data: Dataset,
    rows: list[dict],
    baseline: list[Generation],
    candidate: list[Generation] | None,
    run_dir: Path,
    adapter: Adapter | None = None,
    opponents: dict[str, list[Generation]] | None = None,
    judge: Judge | None = None,
    candidate_name: str = "fine-tuned",
    candidate_source: str | None = None,
    preferences: dict[str, list[float]] | None = None,
) -> EvalReport:
    """Grade the answers of the baseline, the further `opponents` (name -> answers) and the candidate
    (`candidate_name` in the reports, scored from `candidate_source`), bootstrap the intervals, decide the
    gate against every opponent, write the reports."""
    out = run_dir / "eval"
    if judge is not None and judge.memo_path is None:
        judge = dataclasses.replace(judge, memo_path=out / "judgments.json")
    schema = json.loads(data.answer_schema.read_text(encoding="utf-8")) if data.answer_schema else None
    train_answers = _train_answers(data)
    specs = cfg.metrics or metric_set.default_metrics(schema, train_answers if schema is None else None)
    gated = metric_set.gate_keys(specs, schema)
    answers = {"baseline": baseline, **(opponents or {})}
    others = list(answers)
    if candidate is not None:
        answers["candidate"] = candidate

    # 1. Grade each side (the judge scores each answer on its own), then judge the candidate against each
    #    opponent pairwise; keep every side's answers and scores on disk.
    graded, versus = _grade_sides(specs, rows, answers, schema, judge, cfg.max_new_tokens, preferences or {})
    sides = {side: _save_side(out / _slug(side), rows, answers[side], g) for side, g in graded.items()}

    # 2. Paired bootstrap: the same resampled rows (same seed) for every side and metric.
    def paired(side: str) -> tuple:
        cand = versus[side].statistics if side in versus else None
        return bootstrap(graded[side].statistics, cand, cfg.bootstrap_resamples, cfg.seed)

    intervals = {side: paired(side) for side in others}
    base_ci, cand_ci, difference = intervals["baseline"]

    # 3. The gate: the candidate must beat every opponent on every gate metric.
    differences = {side: intervals[side][2] for side in others if intervals[side][2] is not None}
    failures = decide(gated, differences) if candidate is not None else None
    report = EvalReport(
        dir=out,
        rows=len(rows),
        baseline=sides["baseline"]["metrics"],
        candidate=sides["candidate"]["metrics"] if "candidate" in sides else None,
        baseline_ci=base_ci,
        candidate_ci=cand_ci,
        difference=difference,
        flips=None if candidate is None else _flips(graded["baseline"].per_row, graded["candidate"].per_row),
        gate_metrics=gated,
        gate_passed=None if failures is None else not failures,
        gate_failures=failures or [],
        opponents={side: sides[side]["metrics"] for side in others[1:]},
        opponent_ci={side: intervals[side][0] for side in others[1:]},
        opponent_difference={side: differences[side] for side in others[1:] if side in differences},
        candidate_name=candidate_name,
        candidate_source=candidate_source,
        majority=metric_set.majority_rates(specs, train_answers, _references(rows), schema),
    )
    _remove_stale(out, run_dir, [_slug(side) for side in sides])
    if candidate is not None:
        summary = write_report(run_dir, rows, sides, report, adapter)
        full = write_eval_report(run_dir, sides, report)
        report = dataclasses.replace(report, report=summary, html_report=full)
    save_meta(report, out)
    return report


def _train_answers(data: Dataset) -> list[str] | None:
    """The training split's answers, which decide whether the answers are labels; None without the split."""
    if data.train is None or not Path(data.train).is_file():
        return None
    return [row["messages"][-1]["content"] for row in _read_rows(data.train, None)]


def _remove_stale(out: Path, run_dir: Path, current: list[str]) -> None:
    """Sides and reports an earlier evaluation wrote that this one does not (a candidate, production, a
    few-shot baseline), so that nothing on disk contradicts the new meta.json."""
    for directory in out.iterdir():
        if directory.is_dir() and directory.name not in current:
            shutil.rmtree(directory)
    if "candidate" not in current:
        for name in REPORT_FILES:
            (run_dir / name).unlink(missing_ok=True)


def _grade_sides(specs: list, rows: list[dict], answers: dict[str, list[Generation]], schema: dict | None,
                 judge: Judge | None, budget: int | None, preferences: dict[str, list[float]]
                 ) -> tuple[dict[str, metric_set.Graded], dict[str, metric_set.Graded]]:
    """Every side's grades, and the candidate's grades against each opponent (they differ in `pairwise`)."""
    graded = {side: _grade(specs, rows, gens, schema, judge, budget, preferences.get(side))
              for side, gens in answers.items()}
    if "candidate" not in answers:
        return graded, {}
    versus = {side: _pairwise(specs, rows, graded, side, answers, judge) for side in answers if side != "candidate"}
    graded["candidate"] = versus["baseline"]
    return graded, versus


def _grade(specs: list, rows: list[dict], generations: list[Generation], schema: dict | None, judge: Judge | None,
           budget: int | None = None, preferred: list[float] | None = None):
    references = _references(rows)
    answers = [g.text for g in generations]
    graded = metric_set.grade(specs, references, answers, schema)
    if budget is not None:  # answers cut by the generation budget, shown as such in the reports
        graded.add("truncated", [float(g.completion_tokens >= budget) for g in generations])
    if preferred is not None:
        graded.add("preference_accuracy", preferred)
    if any(s.name == "judge" for s in specs):
        scores = score_answers(_needed(judge), _prompts(rows), references, answers)
        graded.add("judge", [normalised(s) for s in scores])
        graded.add("judge.unparsed", [float(s is None) for s in scores])
    return graded


def _pairwise(
    specs: list, rows: list[dict], graded: dict, opponent: str, answers: dict[str, list[Generation]], judge: Judge | None
) -> metric_set.Graded:
    """The candidate's grades with its pairwise outcomes against `opponent`; the opponent gets the mirror."""
    candidate = graded["candidate"]
    if not any(s.name == "pairwise" for s in specs):
        return candidate
    references = [row["messages"][-1]["content"] for row in rows]
    texts = {side: [g.text for g in answers[side]] for side in ("candidate", opponent)}
    outcomes = compare_answers(_needed(judge), _prompts(rows), references, texts["candidate"], texts[opponent])
    versus = metric_set.Graded(dict(candidate.statistics), dict(candidate.per_row), candidate.classification)
    for side, scores in ((versus, outcomes), (graded[opponent], [None if o is None else 1 - o for o in outcomes])):
        side.add("pairwise", scores)
        side.add("pairwise.unparsed", [float(o is None) for o in outcomes])
    return versus


def _needed(judge: Judge | None) -> Judge:
    if judge is None:
        raise TuneloopError("the judge and pairwise metrics need eval.judge (base_url, model)")
    return judge


def _slug(side: str) -> str:
    return side.replace(" ", "-")


def _read_rows(path: Path, limit: int | None) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return rows[:limit] if limit else rows


def _references(rows: list[dict]) -> list[str]:
    return [row["messages"][-1]["content"] for row in rows]


def _prompts(rows: list[dict]) -> list[list[dict[str, str]]]:
    return [row["messages"][:-1] for row in rows]


def _generate_cached(
    directory: Path, fingerprint: dict, generate: Callable[[list], list[Generation]], prompts: list
) -> list[Generation]:
    stamp, saved = directory / "fingerprint.json", directory / "generations.json"
    if stamp.is_file() and saved.is_file() and json.loads(stamp.read_text()) == fingerprint:
        return [Generation(**g) for g in json.loads(saved.read_text())]
    generations = generate(prompts)
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
    binary = [
        m for m, s in baseline.items()
        if m in candidate and not _judge_side_metric(m) and all(v in (0.0, 1.0, None) for v in s + candidate[m])
    ]
    return {m: flips(baseline[m], candidate[m]) for m in binary}


def _judge_side_metric(name: str) -> bool:
    # pairwise is one comparison seen from both sides; an unparsed count and a cut answer are not pass/fail grades
    return name.startswith("pairwise") or name.endswith(".unparsed") or name == "truncated"
