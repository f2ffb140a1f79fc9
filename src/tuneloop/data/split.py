"""Deterministic train/val/test split and content hashes."""

from __future__ import annotations

import hashlib
import json
import random

from tuneloop.data.load import Row


def split_rows(rows: list[Row], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Row]]:
    """Shuffle with `seed` and cut; the same rows and seed give the same split on any machine."""
    order = sorted(rows, key=lambda r: content_hash([r]))  # independent of input order
    random.Random(seed).shuffle(order)
    n_test = round(len(order) * test_fraction)
    n_val = round(len(order) * val_fraction)
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}


def content_hash(rows: list[Row]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row.messages, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
