"""Reading example files row by row into the internal chat form, rejecting what cannot be used.

The format is decided once per file (from its extension and its first usable row, or `format:` in
the config); a row of another shape in the same file is rejected rather than guessed at.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tuneloop.errors import TuneloopError

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SUFFIXES = {".jsonl", ".csv", ".txt"}  # what a directory is searched for
# Row shapes a JSON object (or a CSV row after the column mapping) can have, by the keys that mark them.
SHAPES = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "preference": ("prompt", "chosen", "rejected"),
    "openai_preference": ("input", "preferred_output", "non_preferred_output"),  # OpenAI's DPO file format
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


@dataclass(frozen=True)
class Row:
    source: str  # "file:line", kept with the row so every later count can point back to the input
    messages: list[dict[str, str]]
    rejected: str | None = None  # the rejected answer of a preference pair

    @cached_property
    def canonical(self) -> str:
        """The row as canonical JSON: what content hashes cover and what the split files hold. The
        source is left out, so the same content hashes the same on any machine."""
        record: dict = {"messages": self.messages}
        if self.rejected is not None:
            record["rejected"] = self.rejected
        return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Reject:
    source: str
    reason: str
    kind: str  # short, stable name of the reason, for counting


class RowError(ValueError):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def data_files(path: Path) -> list[Path]:
    """`path` itself, or the example files directly inside it when it is a directory."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise TuneloopError(f"{path}: no {'/'.join(sorted(SUFFIXES))} files in this directory")
        return files
    if not path.is_file():
        raise TuneloopError(f"{path}: data file not found")
    return [path]


def read_examples(
    path: Path, fmt: str = "auto", columns: dict[str, str] | None = None, fix_line_ends: bool = False
) -> tuple[list[Row], list[Reject]]:
    """Parse every row of `path` (a file or a directory of files) into the internal chat form."""
    rows: list[Row] = []
    rejects: list[Reject] = []
    for file in data_files(path):
        if fmt == "text" or (fmt == "auto" and file.suffix == ".txt"):
            _read_text(file, rows, rejects, fix_line_ends)
        elif fmt == "csv" or file.suffix == ".csv":
            _read_records(file, _csv_records(file, columns or {}), "auto" if fmt == "csv" else fmt, rows, rejects)
        else:
            _read_records(file, _jsonl_records(file, fix_line_ends), fmt, rows, rejects)
    return rows, rejects


def _jsonl_records(file: Path, fix_line_ends: bool):
    """Yield (line number, parsed object or RowError) for each non-blank line."""
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(_decode(raw, fix_line_ends))
            except RowError as err:
                yield number, err
            except json.JSONDecodeError as err:
                yield number, RowError("invalid_json", f"invalid JSON: {err.msg} at column {err.colno}")


def _decode(raw: bytes, fix_line_ends: bool) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RowError("invalid_utf8", f"invalid UTF-8 at byte {err.start + 1}") from None
    if text.startswith("\ufeff"):
        if not fix_line_ends:
            raise RowError(
                "bom", "starts with a byte-order mark (BOM); save the file as UTF-8 without BOM or set data.fix_line_ends"
            )
        text = text[1:]
    if text.endswith("\r\n") or "\r" in text.rstrip("\r\n"):
        if not fix_line_ends:
            raise RowError("crlf", "CRLF line ending; save the file with LF line endings or set data.fix_line_ends")
        text = text.replace("\r", "")
    return text


def _csv_records(file: Path, columns: dict[str, str]):
    """Yield (line number, record) with the configured column names mapped to row keys."""
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TuneloopError(f"{file}: invalid UTF-8 at byte {err.start + 1}; CSV files must be UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []  # reads the header, so line numbers below start after it
    rename = {column: key for key, column in columns.items()}
    missing = [column for column in rename if column not in header]
    if missing:
        raise TuneloopError(f"{file}:1: CSV has no column {missing[0]!r} (columns: {', '.join(header)})")
    start = reader.line_num + 1
    for record in reader:
        if None in record or None in record.values():
            yield start, RowError("wrong_columns", "CSV row has a different number of fields than the header")
        else:
            yield start, {rename.get(k, k): v for k, v in record.items()}
        start = reader.line_num + 1


def _read_text(file: Path, rows: list[Row], rejects: list[Reject], fix_line_ends: bool) -> None:
    """Plain text for continued pretraining: each blank-line-separated paragraph is one row."""
    paragraph: list[str] = []
    first = 0
    with file.open("rb") as handle:
        for number, raw in enumerate([*handle, b"\n"], start=1):  # the extra blank line ends the last paragraph
            if not raw.strip():
                if paragraph:
                    rows.append(Row(f"{file}:{first}", [{"role": "assistant", "content": "\n".join(paragraph)}]))
                paragraph, first = [], 0
                continue
            try:
                paragraph.append(_decode(raw, fix_line_ends).rstrip("\n"))
                first = first or number
            except RowError as err:
                rejects.append(Reject(f"{file}:{number}", str(err), err.kind))


def _read_records(file: Path, records, fmt: str, rows: list[Row], rejects: list[Reject]) -> None:
    shape = None if fmt == "auto" else fmt
    for number, record in records:
        source = f"{file}:{number}"
        try:
            if isinstance(record, RowError):
                raise record
            if not isinstance(record, dict):
                raise RowError("wrong_type", f"expected a JSON object, got {type(record).__name__}")
            shape = shape or _detect(record)
            messages, rejected = _to_messages(record, shape)
            rows.append(Row(source, messages, rejected))
        except RowError as err:
            rejects.append(Reject(source, str(err), err.kind))


def _detect(record: dict) -> str:
    for shape, keys in SHAPES.items():
        if all(k in record for k in keys):
            return shape
    raise RowError("unknown_format", f"unknown row format: expected one of {_expected()}")


def _expected() -> str:
    return ", ".join("/".join(f"`{k}`" for k in keys) for keys in SHAPES.values())


def _to_messages(record: dict, shape: str) -> tuple[list[dict[str, str]], str | None]:
    keys = SHAPES[shape]
    if not all(k in record for k in keys):
        wanted = "/".join(f"`{k}`" for k in keys)
        raise RowError("unknown_format", f"unknown row format: expected {wanted} like the rest of this {shape} file")
    rejected = None
    if shape == "chat":
        messages = record["messages"]
    elif shape == "sharegpt":
        messages = _from_sharegpt(record["conversations"])
    elif shape == "alpaca":
        instruction, extra = _text(record, "instruction"), record.get("input") or ""
        if not isinstance(extra, str):
            raise RowError("wrong_type", f"`input` must be a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]
    elif shape == "preference":
        messages = [*_prompt_turns(record["prompt"]), {"role": "assistant", "content": _answer(record, "chosen")}]
        rejected = _answer(record, "rejected")
    elif shape == "openai_preference":
        turns = record["input"].get("messages") if isinstance(record["input"], dict) else None
        if turns is None:
            raise RowError("wrong_type", "`input` must be an object with `messages`")
        messages = [*_prompt_turns(turns), {"role": "assistant", "content": _answer(record, "preferred_output")}]
        rejected = _answer(record, "non_preferred_output")
    elif shape == "text":
        messages = [{"role": "assistant", "content": _text(record, "text")}]
    else:
        messages = [
            {"role": "user", "content": _text(record, "prompt")},
            {"role": "assistant", "content": _text(record, "completion")},
        ]
    if isinstance(record.get("system"), str) and record["system"].strip() and shape != "chat":
        messages = [{"role": "system", "content": record["system"]}, *messages]
    return _checked(messages), rejected


def _text(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"`{key}` must be a string, got {type(value).__name__}")
    return value


def _from_sharegpt(turns: object) -> list[dict]:
    if not isinstance(turns, list):
        raise RowError("wrong_type", f"`conversations` must be a list, got {type(turns).__name__}")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            role = turn.get("from") if isinstance(turn, dict) else turn
            raise RowError("unknown_role", f"unknown or missing role {role!r}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
    return messages


def _prompt_turns(prompt: object) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(t, dict) for t in prompt):
        if prompt[-1].get("role") == "assistant":
            raise RowError("bad_turns", "preference `prompt` must not end with an assistant turn")
        return prompt
    raise RowError("wrong_type", "`prompt` must be a string or a non-empty list of messages")


def _answer(record: dict, key: str) -> str:
    """A preference answer given as text or as messages whose last turn is the assistant's."""
    value = record[key]
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        value = value[-1].get("content")
    if not isinstance(value, str):
        raise RowError("wrong_type", f"`{key}` must be a string or messages ending with an assistant turn")
    if not value.strip():
        raise RowError("empty_content", f"empty `{key}` answer")
    return value


def _checked(messages: object) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RowError("wrong_type", "`messages` must be a non-empty list")
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            role = turn.get("role") if isinstance(turn, dict) else turn
            raise RowError("unknown_role", f"unknown or missing role {role!r}")
        if not isinstance(turn.get("content"), str):
            raise RowError("wrong_type", f"{turn['role']} content must be a string")
        if not turn["content"].strip():
            raise RowError("empty_content", f"empty {turn['role']} content")
    if messages[-1]["role"] != "assistant":
        raise RowError("bad_turns", "conversation does not end with an assistant turn")
    return [{"role": t["role"], "content": t["content"]} for t in messages]
