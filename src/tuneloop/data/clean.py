"""Removing personal data, low-quality rows, exact and near duplicates and test-set copies, each with its reason."""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from datasketch import MinHash, MinHashLSH

from tuneloop.data.load import Row
from tuneloop.data.pii import PiiScanner

NUM_PERM = 128
SHINGLE_WORDS = 5
REFUSAL = re.compile(
    r"^\s*(?:I'?m sorry,? but I (?:can(?:no|')t|am unable)"
    r"|I (?:can(?:no|')t|am unable to|won'?t) (?:help|assist|provide|do that)"
    r"|As an AI(?: language model)?,?|I'm (?:just )?an AI)",
    re.IGNORECASE,
)
_WORDS = re.compile(r"\w+")


@dataclass
class Removed:
    """Rows taken out after validation, by reason, with the kept row each duplicate copies."""

    rows: list[tuple[Row, str, str | None]] = field(default_factory=list)

    def add(self, row: Row, reason: str, like: Row | None = None) -> None:
        self.rows.append((row, reason, like.source if like else None))

    def counts(self) -> Counter[str]:
        return Counter(reason for _, reason, _ in self.rows)


def exact_key(row: Row) -> str:
    """Hash of the row's text with case and whitespace normalised, so trivially reformatted copies match."""
    parts = [f"{m['role']}:{' '.join(m['content'].split()).casefold()}" for m in row.messages]
    parts.append(" ".join((row.rejected or "").split()).casefold())
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def handle_pii(rows: list[Row], scanner: PiiScanner, action: str, found: Counter[str], removed: Removed) -> list[Row]:
    """Redact, drop or keep rows with personal data, counting what was found by kind."""
    kept = []
    system_cache: dict[str, tuple[str, Counter[str]]] = {}  # the same system prompt is on every row
    for row in rows:
        messages, row_found = [], Counter()
        for m in row.messages:
            if m["role"] == "system":
                if m["content"] not in system_cache:
                    system_cache[m["content"]] = scanner.redact(m["content"])
                text, hits = system_cache[m["content"]]
            else:
                text, hits = scanner.redact(m["content"])
            messages.append({"role": m["role"], "content": text})
            row_found.update(hits)
        rejected, hits = scanner.redact(row.rejected) if row.rejected is not None else (None, Counter())
        row_found.update(hits)
        found.update(row_found)
        if row_found and action == "drop":
            removed.add(row, "pii")
        elif row_found and action == "redact":
            kept.append(Row(row.source, messages, rejected))
        else:
            kept.append(row)
    return kept




def quality_problem(row: Row, min_chars: int, max_chars: int, drop_refusals: bool) -> str | None:
    """Why the row is not worth training on, or None."""
    answer = row.messages[-1]["content"]
    length = sum(len(m["content"]) for m in row.messages)
    if len(answer.strip()) < min_chars:
        return "too_short"
    if length > max_chars:
        return "too_long"
    if drop_refusals and REFUSAL.match(answer):
        return "refusal"
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    if len(lines) >= 3:
        top = Counter(lines).most_common(1)[0][1]
        if top >= 3 and top * 2 >= len(lines):
            return "repeated_lines"
    return None


class NearDuplicateIndex:
    """Rows by the word 5-grams of their non-system text. MinHash LSH proposes candidates, tuned to
    miss few true pairs (at the threshold it proposes about 99 %; its default tuning, about 46 %); the
    exact Jaccard similarity of the hashed 5-gram sets then decides, so the threshold means what it says."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold * 0.9, num_perm=NUM_PERM, weights=(0.1, 0.9))
        self.rows: list[tuple[Row, np.ndarray, bool]] = []

    @staticmethod
    def signatures(rows: list[Row]) -> list[tuple[MinHash, np.ndarray]]:
        shingles = [_shingle_hashes(r) for r in rows]
        # The shingles are hashed already; `int` hands those hashes to MinHash unchanged.
        minhashes = MinHash.bulk(shingles, num_perm=NUM_PERM, hashfunc=int)
        return [(m, np.unique(np.array(h, dtype=np.uint32))) for m, h in zip(minhashes, shingles)]

    def match(self, signature: tuple[MinHash, np.ndarray]) -> tuple[Row, bool] | None:
        """The first indexed row (and whether it is a test row) at or above the threshold."""
        minhash, hashes = signature
        for key in sorted(self.lsh.query(minhash)):
            row, other, is_test = self.rows[key]
            common = len(np.intersect1d(hashes, other, assume_unique=True))
            if common >= self.threshold * (len(hashes) + len(other) - common):
                return row, is_test
        return None

    def add(self, row: Row, signature: tuple[MinHash, np.ndarray], is_test: bool) -> None:
        self.lsh.insert(len(self.rows), signature[0])
        self.rows.append((row, signature[1], is_test))


def _shingle_hashes(row: Row) -> list[int]:
    """32-bit hashes of the word 5-grams, each combined from its words' hashes (much faster than
    hashing every joined 5-gram string, and the same on any machine)."""
    # The system prompt is usually shared by every row, so it would make all rows look alike.
    text = "\n".join(m["content"] for m in row.messages if m["role"] != "system") + "\n" + (row.rejected or "")
    words = np.array([_word_hash(w) for w in _WORDS.findall(text.casefold())] or [0], dtype=np.uint64)
    n = min(SHINGLE_WORDS, len(words))
    combined = np.zeros(len(words) - n + 1, dtype=np.uint64)
    for k in range(n):
        combined = combined * np.uint64(1_000_003) + words[k : len(words) - n + 1 + k]  # wraps mod 2**64
    # Fibonacci hashing: the top 32 bits then depend on every bit, also for rows of under five words.
    return ((combined * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)).tolist()


@lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
    return zlib.crc32(word.encode("utf-8"))


def deduplicate(
    rows: list[Row], test_rows: list[Row], threshold: float | None, removed: Removed
) -> tuple[list[Row], list[Row]]:
    """Drop exact, then near duplicates, keeping the first row of each cluster. Test rows are indexed
    first, so a training row that copies one, exactly or nearly, is removed as a test leak."""
    index = NearDuplicateIndex(threshold) if threshold is not None else None
    seen: dict[str, tuple[Row, bool]] = {}
    kept_test = _dedupe(test_rows, index, seen, removed, is_test=True)
    kept = _dedupe(rows, index, seen, removed, is_test=False)
    return kept, kept_test


def _dedupe(
    rows: list[Row],
    index: NearDuplicateIndex | None,
    seen: dict[str, tuple[Row, bool]],
    removed: Removed,
    is_test: bool,
) -> list[Row]:
    unique = []
    for row in rows:
        key = exact_key(row)
        if key in seen:
            like, like_is_test = seen[key]
            removed.add(row, "test_leak" if like_is_test and not is_test else "exact_duplicate", like)
        else:
            seen[key] = (row, is_test)
            unique.append(row)
    if index is None:
        return unique
    kept = []
    for start in range(0, len(unique), 10_000):  # in chunks, so few MinHash objects are alive at once
        chunk = unique[start : start + 10_000]
        for row, signature in zip(chunk, index.signatures(chunk)):
            match = index.match(signature)
            if match is None:
                index.add(row, signature, is_test)
                kept.append(row)
            else:
                like, like_is_test = match
                removed.add(row, "test_leak" if like_is_test and not is_test else "near_duplicate", like)
    return kept
