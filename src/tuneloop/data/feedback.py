"""Feedback on served answers as training examples: a corrected answer (and, where asked, an answer rated
good) becomes a chat row, sent by a seeded hash of its request id either to training or to the production
golden set, never both."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tuneloop.data.split import in_share


@dataclass
class FeedbackExamples:
    train: list[dict[str, Any]] = field(default_factory=list)  # {"messages", "completion_id", "feedback_id"}
    golden: list[dict[str, Any]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> feedback rows that made no example


def served_names(model_name: str) -> re.Pattern[str]:
    """The names a model's versions are served and logged under: `<model>` and `<model>-v<N>`."""
    return re.compile(rf"{re.escape(model_name)}(?:-v\d+)?")


def is_golden(completion_id: str, share: float, seed: int) -> bool:
    return in_share(f"{seed}:{completion_id}", share)


def feedback_examples(
    feedback: list[dict[str, Any]], model_name: str, include_good: bool, golden_share: float, seed: int
) -> FeedbackExamples:
    """Examples from `feedback` (oldest first, each with the prompt, answer and version of its request) about
    versions of `model_name`. The latest rating of a completion is the one that counts."""
    own = served_names(model_name)
    latest = {row["completion_id"]: row for row in feedback if own.fullmatch(row["version"] or "")}
    examples = FeedbackExamples()
    examples.skipped["other_model"] = sum(1 for row in feedback if not own.fullmatch(row["version"] or ""))
    examples.skipped["superseded"] = sum(1 for row in feedback if own.fullmatch(row["version"] or "")) - len(latest)
    for completion_id, row in latest.items():
        answer = row["correction"] or (row["answer"] if row["rating"] == "good" and include_good else None)
        reason = _unusable(row, answer)
        if reason is not None:
            examples.skipped[reason] += 1
            continue
        example = {"messages": [*row["prompt"], {"role": "assistant", "content": answer}],
                   "completion_id": completion_id, "feedback_id": row["id"]}
        (examples.golden if is_golden(completion_id, golden_share, seed) else examples.train).append(example)
    examples.skipped = Counter({k: v for k, v in examples.skipped.items() if v})
    return examples


def _unusable(row: dict[str, Any], answer: str | None) -> str | None:
    if answer is None:
        return "good_not_included" if row["rating"] == "good" else "bad_without_correction"
    if row["prompt"] is None:
        return "prompt_not_kept"  # dropped for personal data
    if not isinstance(row["prompt"], list):
        return "not_chat"  # a /v1/completions prompt: already templated text
    return None
