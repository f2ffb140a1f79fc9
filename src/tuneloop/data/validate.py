"""Checks that need more than the row itself: the task's answer schema and the base model's context."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from tuneloop.artifacts import BaseModelRef
from tuneloop.data.load import Reject, Row
from tuneloop.errors import TuneloopError


def load_schema(path: Path | None) -> dict | None:
    if path is None:
        return None
    if not path.is_file():
        raise TuneloopError(f"{path}: answer schema not found")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TuneloopError(f"{path}:{err.lineno}: answer schema is not valid JSON: {err.msg}") from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise TuneloopError(f"{path}: not a valid JSON schema: {err.message}") from None
    return schema


def schema_rejects(rows: list[Row], schema: dict) -> tuple[list[Row], list[Reject]]:
    """Split off rows whose assistant answer is not JSON that follows `schema`."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    kept, rejects = [], []
    for row in rows:
        try:
            answer = json.loads(row.messages[-1]["content"])
        except json.JSONDecodeError as err:
            rejects.append(Reject(row.source, f"answer is not valid JSON: {err.msg} at column {err.colno}", "schema"))
            continue
        error = jsonschema.exceptions.best_match(validator.iter_errors(answer))
        if error is None:
            kept.append(row)
        else:
            where = "/".join(str(p) for p in error.absolute_path) or "the top level"
            # The validator's own message quotes the offending value, which may be personal data.
            reason = f"answer fails the schema at {where}: `{error.validator}` check"
            rejects.append(Reject(row.source, reason, "schema"))
    return kept, rejects


class TokenCounter:
    """Counts a row's tokens as the base model sees it: rendered with its chat template."""

    def __init__(self, base: BaseModelRef, max_tokens: int | None):
        from tuneloop.models import load_tokenizer

        self.tokenizer = load_tokenizer(base)
        self.max_tokens = max_tokens or _context_length(base.path, self.tokenizer)

    def lengths(self, rows: list[Row]) -> list[int]:
        texts = [self.tokenizer.apply_chat_template(r.messages, tokenize=False) for r in rows]
        lengths = []
        for start in range(0, len(texts), 1024):
            encoded = self.tokenizer(texts[start : start + 1024], add_special_tokens=False)["input_ids"]
            lengths += [len(ids) for ids in encoded]
        return lengths

    def rejects(self, rows: list[Row]) -> tuple[list[Row], list[Reject], dict[str, int]]:
        """Split off rows longer than the context; also return every kept row's length by source."""
        kept, rejects, lengths = [], [], {}
        for row, n in zip(rows, self.lengths(rows)):
            if n > self.max_tokens:
                reason = f"{n} tokens, longer than the {self.max_tokens}-token context"
                rejects.append(Reject(row.source, reason, "too_many_tokens"))
            else:
                kept.append(row)
                lengths[row.source] = n
        return kept, rejects, lengths


def _context_length(model_dir: Path, tokenizer) -> int:
    config = model_dir / "config.json"
    if config.is_file():
        length = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
        if isinstance(length, int) and length > 0:
            return length
    if 0 < tokenizer.model_max_length < 1_000_000:  # tokenizers without a limit report a huge sentinel
        return tokenizer.model_max_length
    raise TuneloopError(f"{model_dir}: cannot tell the model's context length; set data.max_tokens")
