"""Deterministic, optionally stratified train/val/test split and content hashes."""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict

from tuneloop.data.load import Row


def split_rows(
    rows: list[Row], val_fraction: float, test_fraction: float, seed: int, labels: list[str] | None = None
) -> dict[str, list[Row]]:
    """Shuffle with `seed` and cut; the same rows and seed give the same split on any machine.

    With `labels`, each label's rows are shuffled on their own and then interleaved by their relative
    position within the label, so every cut holds each label in its overall share (to a row)."""
    keyed = sorted(zip(rows, labels or [""] * len(rows)), key=lambda p: p[0].canonical)  # independent of input order
    groups: dict[str, list[Row]] = defaultdict(list)
    for row, label in keyed:
        groups[label].append(row)
    rng = random.Random(seed)
    ranked = []
    for number, label in enumerate(sorted(groups)):
        group = groups[label]
        rng.shuffle(group)
        ranked += [((i + 0.5) / len(group), number, row) for i, row in enumerate(group)]
    order = [row for *_, row in sorted(ranked, key=lambda t: t[:2])]
    n_test = round(len(order) * test_fraction)
    n_val = round(len(order) * val_fraction)
    return {"train": order[n_test + n_val :], "val": order[n_test : n_test + n_val], "test": order[:n_test]}


def labels_of(rows: list[Row], label_field: str | None) -> list[str] | None:
    """Labels to stratify on: `label_field` of a JSON-object answer, or the answer itself when the
    answers are a small set of labels; None when neither applies."""
    answers = [r.messages[-1]["content"].strip() for r in rows]
    if label_field is not None:
        return [_field(answer, label_field) for answer in answers]
    distinct = set(answers)
    if len(rows) >= 20 and len(distinct) <= max(2, len(rows) // 20) and all(len(a) <= 40 for a in distinct):
        return answers
    return None


def _field(answer: str, name: str) -> str:
    try:
        parsed = json.loads(answer)
    except json.JSONDecodeError:
        return ""
    return json.dumps(parsed.get(name), sort_keys=True) if isinstance(parsed, dict) else ""


def in_share(key: str, share: float) -> bool:
    """Whether `key` falls in a `share` of all keys, by its SHA-256: the same key decides the same way on any
    machine and in any order, with no state kept."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < share * 2**64


def content_hash(rows: list[Row]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.canonical.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
