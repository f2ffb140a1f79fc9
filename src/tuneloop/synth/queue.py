"""The review queue of synthetic rows (`synth/queue.jsonl` in the run directory): each row with its origin
and status (pending, accepted, edited, rejected), the decisions people make on it, and the reviewed rows
that a dataset version can train on (`synth/reviewed.jsonl`)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections import Counter
from pathlib import Path
from typing import Literal

from tuneloop.data.load import Row
from tuneloop.data.validate import schema_rejects
from tuneloop.errors import TuneloopError

QUEUE = "queue.jsonl"
REVIEWED = "reviewed.jsonl"
ACTIONS = ("accept", "edit", "reject")


@dataclasses.dataclass(frozen=True)
class Decision:
    id: str
    action: Literal["accept", "edit", "reject"]
    answer: str | None = None  # the corrected answer of an edit
    reason: str | None = None


def read_queue(folder: Path) -> list[dict]:
    path = folder / QUEUE
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()] if path.is_file() else []


def add_to_queue(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / QUEUE).open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps({**row, "status": "pending"}, ensure_ascii=False) + "\n" for row in rows)


def read_decisions(path: Path) -> list[Decision]:
    """Decisions from a JSONL file (or one JSON list): `{"id", "action": accept|edit|reject, "answer"
    (an edit's answer: text, or the JSON object itself), "reason"}`."""
    if not path.is_file():
        raise TuneloopError(f"{path}: decisions file not found")
    text = path.read_text("utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else None
    except json.JSONDecodeError as err:
        raise TuneloopError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    numbered = list(enumerate(records, start=1)) if records is not None else [
        (number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()
    ]
    decisions = []
    for number, record in numbered:
        if isinstance(record, str):
            try:
                record = json.loads(record)
            except json.JSONDecodeError as err:
                raise TuneloopError(f"{path}:{number}: not valid JSON: {err.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or record.get("action") not in ACTIONS:
            raise TuneloopError(f"{path}:{number}: a decision needs an `id` and an `action` (one of {', '.join(ACTIONS)})")
        answer = record.get("answer")
        if record["action"] == "edit" and answer in (None, ""):
            raise TuneloopError(f"{path}:{number}: an edit needs the corrected `answer`")
        if answer is not None and not isinstance(answer, str):
            answer = json.dumps(answer, ensure_ascii=False)
        decisions.append(Decision(record["id"], record["action"], answer, record.get("reason")))
    return decisions


def edit_problem(row: dict, answer: str, schema: dict | None) -> str | None:
    """Why an edited answer cannot be taken (it fails the task's schema), or None."""
    if schema is None:
        return None if answer.strip() else "the answer is empty"
    _, rejects = schema_rejects([Row(row["id"], [*row["messages"][:-1], {"role": "assistant", "content": answer}])], schema)
    return rejects[0].reason if rejects else None


def apply_decisions(folder: Path, decisions: list[Decision], reviewer: str, schema: dict | None) -> Counter[str]:
    """Record `decisions` on pending rows, all or none: an unknown or already reviewed id, a second decision
    on one row or an edit that fails the schema stops with nothing recorded."""
    from filelock import FileLock

    with FileLock(str(folder / f"{QUEUE}.lock")):
        rows = read_queue(folder)
        by_id = {row["id"]: row for row in rows}
        seen: set[str] = set()
        for decision in decisions:
            row = by_id.get(decision.id)
            if row is None:
                raise TuneloopError(f"no synthetic row {decision.id!r} in {folder / QUEUE}; nothing was recorded")
            if row["status"] != "pending" or decision.id in seen:
                raise TuneloopError(f"row {decision.id} is already reviewed ({row['status']}); nothing was recorded")
            seen.add(decision.id)
            if decision.action == "edit":
                problem = edit_problem(row, decision.answer or "", schema)
                if problem:
                    raise TuneloopError(f"row {decision.id}: the edited {problem}; nothing was recorded")
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for decision in decisions:
            row = by_id[decision.id]
            if decision.action == "edit":
                row["original_answer"] = row["messages"][-1]["content"]
                row["messages"] = [*row["messages"][:-1], {"role": "assistant", "content": decision.answer}]
            status = {"accept": "accepted", "edit": "edited", "reject": "rejected"}[decision.action]
            row.update(status=status, reviewed_by=reviewer, reviewed_at=now)
            if decision.reason:
                row["review_reason"] = decision.reason
        _write_atomically(folder / QUEUE, rows)
        _write_atomically(folder / REVIEWED, [_reviewed(row) for row in rows if row["status"] in ("accepted", "edited")])
    return Counter(row["status"] for row in rows)


def _reviewed(row: dict) -> dict:
    """A reviewed row as training data, its origin beside the messages."""
    origin = {k: row[k] for k in ("id", "teacher", "terms", "status", "reviewed_by", "reviewed_at") if k in row}
    return {"messages": row["messages"], "synthetic": origin}


def synthetic_lineage(path: Path) -> dict:
    """What a dataset version records of its synthetic rows: their file, teachers, terms and reviewers."""
    origins = [json.loads(line).get("synthetic", {}) for line in path.read_text("utf-8").splitlines() if line.strip()]
    return {
        "file": str(path),
        "teachers": sorted({o["teacher"] for o in origins if o.get("teacher")}),
        "terms": sorted({o["terms"] for o in origins if o.get("terms")}),
        "reviewed_by": sorted({o["reviewed_by"] for o in origins if o.get("reviewed_by")}),
        "edited": sum(o.get("status") == "edited" for o in origins),
    }


def _write_atomically(path: Path, rows: list[dict]) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    os.replace(temporary, path)
