"""Reading example files row by row into the internal chat form, rejecting what cannot be used."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tuneloop.errors import TuneloopError

ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Row:
    source: str  # "file:line", kept with the row so every later count can point back to the input
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class Reject:
    source: str
    reason: str


def read_examples(path: Path) -> tuple[list[Row], list[Reject]]:
    """Parse a JSONL file of chat (`messages`) or `prompt`/`completion` rows."""
    if not path.is_file():
        raise TuneloopError(f"{path}: data file not found")
    rows: list[Row] = []
    rejects: list[Reject] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            source = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                rows.append(Row(source, _to_messages(record)))
            except UnicodeDecodeError:
                rejects.append(Reject(source, "invalid UTF-8"))
            except json.JSONDecodeError as err:
                rejects.append(Reject(source, f"invalid JSON: {err.msg} at column {err.colno}"))
            except ValueError as err:
                rejects.append(Reject(source, str(err)))
    return rows, rejects


def _to_messages(record: object) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    else:
        raise ValueError("unknown row format: expected `messages` or `prompt`/`completion`")
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list")
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise ValueError(f"unknown or missing role {turn.get('role') if isinstance(turn, dict) else turn!r}")
        if not isinstance(turn.get("content"), str):
            raise ValueError(f"{turn['role']} content must be a string")
        if not turn["content"].strip():
            raise ValueError(f"empty {turn['role']} content")
    if messages[-1]["role"] != "assistant":
        raise ValueError("conversation does not end with an assistant turn")
    return [{"role": t["role"], "content": t["content"]} for t in messages]
