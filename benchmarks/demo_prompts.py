"""The ticket-triage demo's user messages as chat prompts, for the benchmarks that load a model with them."""

from __future__ import annotations

import json
from pathlib import Path

from tuneloop.config import load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ticket-triage" / "config.yaml"


def chat_prompts(count: int | None = None) -> list[list[dict[str, str]]]:
    """The first `count` ticket-triage questions (all by default), each after the task's system prompt."""
    data = load_config(EXAMPLE).data
    prompts = []
    with data.path.open(encoding="utf-8") as handle:
        for line in handle:
            turns = [m for m in json.loads(line)["messages"][:-1] if m["role"] != "system"]
            prompts.append([{"role": "system", "content": data.system_prompt}, *turns])
            if len(prompts) == count:
                break
    return prompts
