"""New training rows from a teacher model (`tuneloop synth`) and their human review (`tuneloop review`).
The pipeline puts every new row through the data stage before it reaches the review queue."""

from __future__ import annotations

import random

from tuneloop.config import SynthConfig
from tuneloop.evaluate.endpoint import Endpoint, client, in_parallel
from tuneloop.synth.queue import (
    Decision,
    add_to_queue,
    apply_decisions,
    edit_problem,
    read_decisions,
    read_queue,
    synthetic_lineage,
)
from tuneloop.synth.teacher import Example, read_reply, reply_format, teacher_messages


def ask_teacher(
    cfg: SynthConfig,
    endpoint: Endpoint,
    instructions: str | None,
    examples: list[Example],
    schema: dict | None,
    requests: int,
    rng: random.Random,
) -> list[tuple[list[Example], list[tuple[str, str]]]]:
    """`requests` requests to the teacher at once, each showing examples drawn at random; per request, the
    new examples read from its reply and (kind, reason) for each part that could not be read, or for the
    request itself when it failed after the client's retries."""
    import openai

    openai_client = client(endpoint)
    response_format = reply_format(schema)
    chats = [
        teacher_messages(instructions, rng.sample(examples, min(cfg.examples_per_request, len(examples))),
                         cfg.rows_per_request, schema)
        for _ in range(requests)
    ]

    def one(messages: list[dict]) -> tuple[list[Example], list[tuple[str, str]]]:
        try:
            reply = openai_client.chat.completions.create(
                model=endpoint.model, messages=messages, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                response_format=response_format,
            )
        except openai.OpenAIError as err:
            return [], [("request_failed", f"{type(err).__name__}: {str(err)[:300]}")]
        choices = getattr(reply, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            return [], [("unreadable_reply", "not a chat completion (no choices[0].message)")]
        return read_reply(choices[0].message.content or "")

    return in_parallel(one, chats, endpoint.concurrency)


__all__ = [
    "Decision",
    "Example",
    "add_to_queue",
    "apply_decisions",
    "ask_teacher",
    "edit_problem",
    "read_decisions",
    "read_queue",
    "synthetic_lineage",
]
