"""The few-shot baseline: k solved examples from the train split shown before each test prompt."""

from __future__ import annotations

import json
import random
from pathlib import Path


def draw_shots(train: Path, k: int, seed: int) -> list[list[dict[str, str]]]:
    """k examples drawn without replacement from the train split (never the test rows), seeded; each is
    its conversation without the system prompt, ending in the assistant's answer."""
    with train.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    picked = random.Random(seed).sample(rows, min(k, len(rows)))
    return [[m for m in row["messages"] if m["role"] != "system"] for row in picked]


def with_shots(prompt: list[dict[str, str]], shots: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    """`prompt` with the examples' user/assistant turns inserted after its system prompt."""
    system = [m for m in prompt[:1] if m["role"] == "system"]
    turns = [turn for shot in shots for turn in shot]
    return [*system, *turns, *prompt[len(system) :]]
