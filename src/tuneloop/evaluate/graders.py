"""Graders: pure functions from a model answer and a reference to a score."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jsonschema


def parse_json(text: str) -> Any | None:
    """The answer parsed as JSON, tolerating a Markdown code fence around it; None when it is not JSON."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`").removeprefix("json").strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        return None


def json_valid(answer: str) -> bool:
    return parse_json(answer) is not None


def schema_valid(answer: str, schema: dict) -> bool:
    parsed = parse_json(answer)
    return parsed is not None and _validator(json.dumps(schema, sort_keys=True)).is_valid(parsed)


@lru_cache(maxsize=8)
def _validator(schema_text: str) -> jsonschema.protocols.Validator:
    schema = json.loads(schema_text)
    return jsonschema.validators.validator_for(schema)(schema)


def field_matches(answer: str, reference: str, fields: list[str] | None = None) -> dict[str, bool] | None:
    """Per top-level field of a JSON-object reference (or only `fields`): does the answer hold the
    same value? None when the reference is not a JSON object (the metric does not apply)."""
    expected = parse_json(reference)
    if not isinstance(expected, dict):
        return None
    got = parse_json(answer)
    got = got if isinstance(got, dict) else {}
    keys = [k for k in expected if fields is None or k in fields]
    return {key: key in got and _same(got[key], expected[key]) for key in keys}


def categorical_fields(schema: dict) -> list[str]:
    """Top-level properties with a closed set of values (enum, boolean, number), where an exact
    comparison is meaningful; free-text fields are left to ROUGE-L."""
    closed = []
    for name, spec in schema.get("properties", {}).items():
        if "enum" in spec or "const" in spec or spec.get("type") in ("boolean", "integer", "number"):
            closed.append(name)
    return closed


def _same(got: Any, expected: Any) -> bool:
    if isinstance(expected, str) and isinstance(got, str):
        return got.strip().casefold() == expected.strip().casefold()
    return got == expected


def exact_match(answer: str, reference: str) -> bool:
    return answer.strip() == reference.strip()


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(answer: str, reference: str) -> float:
    return _rouge().score(reference, answer)["rougeL"].fmeasure
