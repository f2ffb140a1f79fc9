"""Growing a small dataset: a teacher writes new rows (`synth`), every one goes through the data stage
against the current dataset (schema, length, personal data, duplicates of existing rows, copies of test
rows), can be scored by the judge, and waits in the review queue; `review` records people's decisions and
makes the reviewed rows a dataset version of their own lineage. Synthetic rows never enter the test split."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections import Counter
from pathlib import Path

from tuneloop.artifacts import BaseModelRef, Dataset
from tuneloop.config import RunConfig
from tuneloop.errors import TuneloopError
from tuneloop.pipeline.loop import (
    DatasetVersion,
    Progress,
    _secret,
    judge_for,
    load_dataset,
    prepare_data,
    resolve_base,
    silent,
)
from tuneloop.synth import Decision, Example

SYNTH = "synth"  # run_dir/synth: the review queue, the reviewed rows, and one folder per `synth` run
NO_REFERENCE = "(none: this is a new example; judge the answer on the task's instructions alone)"


@dataclasses.dataclass(frozen=True)
class SynthResult:
    """One `synth` run: `queued` new rows wait for review (at most `wanted`); `rejected` counts the rest by
    reason (each is in `dir/rejects.jsonl`); `surplus` rows passed every check beyond the `wanted` count."""

    dir: Path
    wanted: int
    queued: int
    requests: int
    candidates: int
    rejected: dict[str, int]
    surplus: int
    message: str


@dataclasses.dataclass(frozen=True)
class ReviewResult:
    statuses: dict[str, int]  # queue rows by status, after the decisions
    data: Dataset | None  # the dataset version with the reviewed rows, when there are any
    version: DatasetVersion | None


def synth(cfg: RunConfig, n: int, progress: Progress = silent) -> SynthResult:
    """Ask `synth.teacher` for new rows until `n` pass the data stage's checks (and the judge's minimum) or
    `synth.max_requests` is reached; the rows that pass join the review queue."""
    from tuneloop.data.validate import load_schema
    from tuneloop.evaluate.endpoint import Endpoint
    from tuneloop.synth import add_to_queue, ask_teacher

    if cfg.synth.teacher is None:
        raise TuneloopError("synth.teacher is not set: give the OpenAI-compatible endpoint and model that writes rows")
    if cfg.synth.judge and cfg.eval.judge is None:
        raise TuneloopError("synth.judge needs eval.judge: the judge endpoint and rubric that score the new rows")
    data = load_dataset(cfg)
    instructions, examples = _task_examples(data, cfg.data.system_prompt)
    schema = load_schema(data.answer_schema)
    teacher = Endpoint.from_config(cfg.synth.teacher, _secret(cfg.synth.teacher.api_key_env))
    max_requests = cfg.synth.max_requests or 3 * math.ceil(n / cfg.synth.rows_per_request)
    numbers = [int(d.name) for d in (cfg.run_dir / SYNTH).glob("[0-9]*") if d.name.isdigit()]
    out = cfg.run_dir / SYNTH / f"{max(numbers, default=0) + 1:03d}"
    out.mkdir(parents=True)
    base = resolve_base(cfg)
    rng = random.Random(cfg.synth.seed + int(out.name))
    candidates: list[dict] = []
    asking: list[dict] = []  # rejects of the teacher's replies, before any row exists
    judged: dict[str, int | None] = {}
    passed: list[dict] = []
    checked: list[dict] = []  # rejects of the rows written, by the data stage and the judge
    waiting = pending_rows(cfg)  # rows earlier runs left for review count as existing rows
    requests = 0
    progress(f"synth: {n} rows wanted from {teacher.model} at {teacher.base_url} (at most {max_requests} requests)")
    while len(passed) < n and requests < max_requests:
        batch = min(math.ceil((n - len(passed)) / cfg.synth.rows_per_request), teacher.concurrency,
                    max_requests - requests)
        replies = ask_teacher(cfg.synth, teacher, instructions, examples, schema, batch, rng)
        for number, (new, problems) in enumerate(replies, start=requests + 1):
            asking += [{"id": None, "request": number, "kind": kind, "reason": reason} for kind, reason in problems]
            for example in new:
                candidates.append(_candidate(f"{out.name}-{len(candidates) + 1:04d}", number, example, instructions))
        requests += batch
        if all(p and p[0][0] == "request_failed" for _, p in replies) and not candidates:
            raise TuneloopError(f"teacher {teacher.base_url} (model {teacher.model!r}): every request failed: "
                                f"{replies[0][1][0][1]}")
        passed, checked = _check(cfg, data, base, candidates, out, waiting)
        passed = _judged(cfg, passed, judged, checked)
        progress(f"  {requests} requests: {len(candidates)} rows written, {len(passed)} passed the checks")
    queued = passed[:n]
    rejected_rows = asking + checked
    terms = cfg.synth.teacher_terms
    add_to_queue(cfg.run_dir / SYNTH, [{**row, "teacher": teacher.model, "terms": terms} for row in queued])
    (out / "rejects.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected_rows), "utf-8")
    counts = dict(sorted(Counter(r["kind"] for r in rejected_rows).items()))
    message = (f"{len(queued)} new rows wait for review: tuneloop review CONFIG" if len(queued) == n else
               f"only {len(queued)} of {n} rows passed the checks within synth.max_requests ({max_requests}); "
               f"{len(queued)} wait for review")
    result = SynthResult(out, n, len(queued), requests, len(candidates), counts, len(passed) - len(queued), message)
    (out / "report.json").write_text(json.dumps(dataclasses.asdict(result), default=str, indent=2), "utf-8")
    return result


def _task_examples(data: Dataset, system_prompt: str | None) -> tuple[str | None, list[Example]]:
    """The task's instructions (the config's system prompt, else the training rows' most common one) and
    the single-turn training rows, as the teacher is shown them."""
    rows = [json.loads(line) for line in data.train.read_text("utf-8").splitlines()]
    if any("rejected" in r for r in rows):
        raise TuneloopError("synth writes answers, not preference pairs: this dataset's rows carry rejected answers")
    turns = [[m for m in r["messages"] if m["role"] != "system"] for r in rows]
    examples = [Example(t[0]["content"], t[1]["content"]) for t in turns if len(t) == 2 and t[0]["role"] == "user"]
    if not examples:
        raise TuneloopError("synth writes single-turn rows (a user message and its answer); the training split has "
                            "none to show the teacher")
    systems = Counter(m["content"] for r in rows for m in r["messages"][:1] if m["role"] == "system")
    return system_prompt or (systems.most_common(1)[0][0] if systems else None), examples


def _candidate(row_id: str, request: int, example: Example, instructions: str | None) -> dict:
    system = [{"role": "system", "content": instructions}] if instructions else []
    messages = [*system, {"role": "user", "content": example.input}, {"role": "assistant", "content": example.output}]
    return {"id": row_id, "request": request, "messages": messages}


def _check(cfg: RunConfig, data: Dataset, base: BaseModelRef, candidates: list[dict], out: Path, waiting: list[dict]):
    """The candidates through the data stage beside the dataset's train and val rows (and the rows that
    earlier runs left waiting for review) and against its test rows: those that pass (with personal data
    redacted as configured), and a reject for each of the rest."""
    from tuneloop.data import prepare

    existing = out / "existing.jsonl"
    if not existing.is_file():
        earlier = "".join(json.dumps({"messages": row["messages"]}, ensure_ascii=False) + "\n" for row in waiting)
        existing.write_text(data.train.read_text("utf-8") + data.val.read_text("utf-8") + earlier, "utf-8")
    written = out / "candidates.jsonl"
    written.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in candidates), "utf-8")
    check_cfg = cfg.data.model_copy(update={
        "path": existing, "test_path": data.test, "val_path": None, "synthetic_path": written, "format": "chat",
        "columns": {}, "val_fraction": 0.0, "test_fraction": 0.0, "max_reject_fraction": 1.0,
        "perplexity_percentile": None, "label_field": None,
    })
    checked = prepare(check_cfg, out / "check", base)
    line_of = {f"{written}:{i}": c for i, c in enumerate(candidates, start=1)}
    passed = []
    for line in checked.train.read_text("utf-8").splitlines():
        row = json.loads(line)
        if row["source"] in line_of:
            passed.append({**line_of[row["source"]], "messages": row["messages"]})
    rejects = []
    for name in ("rejects.jsonl", "removed.jsonl"):
        for line in (checked.dir / name).read_text("utf-8").splitlines():
            record = json.loads(line)
            if record["source"] in line_of:
                kind = record.get("kind") or record["reason"]
                found = {"id": line_of[record["source"]]["id"], "request": line_of[record["source"]]["request"],
                         "kind": kind, "reason": record["reason"]}
                if record.get("like"):
                    found["like"] = record["like"]
                rejects.append(found)
    return passed, rejects


def _judged(cfg: RunConfig, passed: list[dict], judged: dict[str, int | None], rejects: list[dict]) -> list[dict]:
    """With `synth.judge`, each passing row's 1-5 score (asked once per row); rows under `min_judge_score`
    become rejects."""
    if not cfg.synth.judge:
        return passed
    from tuneloop.evaluate.judge import score_answers

    new = [row for row in passed if row["id"] not in judged]
    if new:
        scores = score_answers(judge_for(cfg), [r["messages"][:-1] for r in new], [NO_REFERENCE] * len(new),
                               [r["messages"][-1]["content"] for r in new])
        judged.update({row["id"]: score for row, score in zip(new, scores)})
    kept = []
    for row in passed:
        score, least = judged[row["id"]], cfg.synth.min_judge_score
        if least is not None and score is not None and score < least:
            rejects.append({"id": row["id"], "request": row["request"], "kind": "judge_score",
                            "reason": f"the judge scored it {score}, under synth.min_judge_score {least}"})
        else:
            kept.append({**row, "judge_score": score})
    return kept


def pending_rows(cfg: RunConfig) -> list[dict]:
    """Rows in the review queue that wait for a decision, oldest first."""
    from tuneloop.synth import read_queue

    return [row for row in read_queue(cfg.run_dir / SYNTH) if row["status"] == "pending"]


def edit_problem(cfg: RunConfig, row: dict, answer: str) -> str | None:
    """Why an edited answer cannot replace `row`'s (it fails the task's schema), or None."""
    from tuneloop.data.validate import load_schema
    from tuneloop.synth import edit_problem as problem

    return problem(row, answer, load_schema(cfg.data.answer_schema))


def review(cfg: RunConfig, decisions: list[Decision], reviewer: str, progress: Progress = silent) -> ReviewResult:
    """Record `decisions` in the review queue; the accepted and edited rows, with the config's data, become
    the dataset version in the run's data folder (lineage: the previous version, the teacher and its terms,
    who reviewed). Later runs keep them with `data.synthetic_path` set to the reviewed file."""
    from tuneloop.data.validate import load_schema
    from tuneloop.synth import apply_decisions
    from tuneloop.synth.queue import REVIEWED

    folder = cfg.run_dir / SYNTH
    statuses = apply_decisions(folder, decisions, reviewer, load_schema(cfg.data.answer_schema))
    progress(f"review: {len(decisions)} decisions recorded; queue: "
             + ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())))
    if not statuses["accepted"] + statuses["edited"]:
        return ReviewResult(dict(statuses), None, None)
    parent = load_dataset(cfg).hash  # the version `synth` drew its rows against
    with_rows = cfg.model_copy(update={"data": cfg.data.model_copy(update={"synthetic_path": folder / REVIEWED})})
    data, version = prepare_data(with_rows, resolve_base(cfg), progress, parent=parent)
    progress(f"dataset {data.hash[:12]}: {data.counts['synthetic']} reviewed synthetic rows in train; later runs keep "
             f"them with data.synthetic_path: {folder / REVIEWED}")
    return ReviewResult(dict(statuses), data, version)
