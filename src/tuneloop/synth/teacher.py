"""Asking a teacher model for new rows: the request (the task's instructions, example rows, the answer
format) and the reading of its reply into (input, answer) pairs, with a reason for whatever cannot be read."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SYSTEM = (
    "You write new examples for a dataset that fine-tunes a model on one task. Each example is an input a "
    "user of the task could send and the answer the task's instructions call for. Reply with JSON only."
)


@dataclass(frozen=True)
class Example:
    input: str
    output: str


def teacher_messages(instructions: str | None, examples: list[Example], count: int, schema: dict | None) -> list[dict]:
    """The chat that asks for `count` new examples like `examples`."""
    answer_format = (
        f"Each output is a JSON object that follows this JSON schema:\n{json.dumps(schema, ensure_ascii=False)}"
        if schema is not None
        else "Each output is text, in the style and format of the examples' outputs."
    )
    shown = "\n".join(
        json.dumps({"input": e.input, "output": _shown_output(e.output, schema)}, ensure_ascii=False) for e in examples
    )
    request = (
        f"## The task's instructions (its system prompt)\n{instructions or '(none)'}\n\n"
        f"## Answer format\n{answer_format}\n\n## Examples\n{shown}\n\n"
        f"Write {count} new examples for this task. Make the inputs realistic and varied in topic, length, wording "
        "and difficulty, different from the examples above and from each other, and give each the answer the "
        'instructions call for. Reply with a JSON object: {"examples": [{"input": "...", "output": ...}]}.'
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": request}]


def reply_format(schema: dict | None) -> dict:
    """The structured-output `response_format` for a reply of examples."""
    item = {
        "type": "object",
        "properties": {"input": {"type": "string"}, "output": schema if schema is not None else {"type": "string"}},
        "required": ["input", "output"],
    }
    reply = {"type": "object", "properties": {"examples": {"type": "array", "items": item}}, "required": ["examples"]}
    return {"type": "json_schema", "json_schema": {"name": "examples", "schema": reply}}


def read_reply(text: str) -> tuple[list[Example], list[tuple[str, str]]]:
    """The examples in a teacher's reply, and (kind, reason) for each part that is not one."""
    body = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text)
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError as err:
        return [], [("unreadable_reply", f"the reply is not JSON: {err.msg} at column {err.colno}")]
    items = parsed.get("examples") if isinstance(parsed, dict) else parsed
    if not isinstance(items, list):
        return [], [("unreadable_reply", 'the reply has no "examples" list')]
    examples, problems = [], []
    for number, item in enumerate(items, start=1):
        text_in = item.get("input") if isinstance(item, dict) else None
        output = item.get("output") if isinstance(item, dict) else None
        if not isinstance(text_in, str) or not text_in.strip() or output in (None, ""):
            problems.append(("incomplete_example", f"example {number} of the reply lacks a text `input` or an `output`"))
            continue
        answer = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        examples.append(Example(text_in.strip(), answer.strip()))
    return examples, problems


def _shown_output(output: str, schema: dict | None):
    if schema is None:
        return output
    try:
        return json.loads(output)
    except json.JSONDecodeError:
        return output
