"""From the configured metrics to per-row scores and bootstrap statistics for one model's answers."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tuneloop.config import MetricConfig
from tuneloop.errors import TuneloopError
from tuneloop.evaluate import classification, graders
from tuneloop.evaluate.stats import Statistic, mean_statistic, per_resample


@dataclass
class Graded:
    statistics: dict[str, Statistic] = field(default_factory=dict)  # metric -> statistic, in display order
    per_row: dict[str, list[float | None]] = field(default_factory=dict)  # row-level scores, None: n/a
    classification: dict[str, dict] = field(default_factory=dict)  # label field -> classify() result

    @property
    def metrics(self) -> dict[str, float]:
        return {name: stat.value() for name, stat in self.statistics.items()}

    def add(self, name: str, scores: list[float | None]) -> None:
        self.per_row[name] = scores
        self.statistics[name] = mean_statistic(scores)


MAX_LABELS = 20  # answers drawn from at most this many distinct values are labels


def default_metrics(schema: dict | None, train_answers: list[str] | None = None) -> list[MetricConfig]:
    """With a schema: JSON validity, schema compliance (the gate), per-field accuracy, label accuracy on the
    first enum field, item precision/recall/F1 for each array of objects, ROUGE-L and exact match. Without
    one, for answers that are labels (at most 20 distinct training answers, each used twice on average):
    accuracy (the gate) and macro-F1 over those labels, and exact match; else ROUGE-L (the gate) and exact
    match."""
    if schema is None:
        labels = sorted({graders.extract_label(a, None) for a in train_answers or []} - {None, ""})
        if labels and len(labels) <= MAX_LABELS and 2 * len(labels) <= len(train_answers or []):
            return [MetricConfig(name="classification", gate=True, labels=labels), MetricConfig(name="exact_match")]
        return [MetricConfig(name="rouge_l", gate=True), MetricConfig(name="exact_match")]
    specs = [
        MetricConfig(name="json_valid"),
        MetricConfig(name="schema_valid", gate=True),
        MetricConfig(name="field_accuracy"),
    ]
    enum_fields = [name for name, spec in schema.get("properties", {}).items() if "enum" in spec]
    if enum_fields:
        specs.append(MetricConfig(name="classification", field=enum_fields[0]))
    specs += [MetricConfig(name="item_f1", field=name, keys=keys) for name, keys in graders.object_arrays(schema).items()]
    return [*specs, MetricConfig(name="rouge_l"), MetricConfig(name="exact_match")]


def majority_rates(specs: list[MetricConfig], train_answers: list[str] | None, references: list[str],
                   schema: dict | None) -> dict[str, float]:
    """What always answering the training split's most common value scores on the test references, per
    closed field (`field.NAME`) and label metric (`PREFIX.accuracy`): the rate a fine-tune must beat to have
    learned more than the label distribution. Empty without training answers."""
    if not train_answers:
        return {}
    rates: dict[str, float] = {}
    parsed = [a for a in map(graders.parse_json, train_answers) if isinstance(a, dict)]
    for spec in specs:
        if spec.name == "field_accuracy":
            for name in spec.fields or (graders.categorical_fields(schema) if schema else []):
                values = Counter(json.dumps(a[name], sort_keys=True) for a in parsed if name in a)
                if not values:
                    continue
                answer = json.dumps({name: json.loads(values.most_common(1)[0][0])})
                matches = [m[name] for m in (graders.field_matches(answer, r, [name]) for r in references) if m and name in m]
                if matches:
                    rates[f"field.{name}"] = float(np.mean(matches))
        elif spec.name == "classification":
            labels = Counter(label for label in (graders.extract_label(a, spec.field) for a in train_answers) if label)
            truth = [graders.extract_label(r, spec.field) for r in references]
            if labels and truth:
                most_common = labels.most_common(1)[0][0]
                rates[metric_key(spec)] = float(np.mean([t == most_common for t in truth]))
    return rates


def metric_key(spec: MetricConfig) -> str:
    """The name a metric's headline value is reported and gated under."""
    if spec.name == "classification":
        return f"{spec.field or 'label'}.accuracy"
    if spec.name == "item_f1":
        return f"{spec.field or 'items'}.f1"
    return spec.name


def gate_keys(specs: list[MetricConfig], schema: dict | None) -> list[str]:
    """Metrics marked `gate: true`; when none is, schema compliance with a schema, else the first metric."""
    marked = [metric_key(s) for s in specs if s.gate]
    if marked:
        return marked
    if schema is not None and any(s.name == "schema_valid" for s in specs):
        return ["schema_valid"]
    return [metric_key(specs[0])]


def grade(specs: list[MetricConfig], references: list[str], answers: list[str], schema: dict | None) -> Graded:
    """Score every answer against its reference with each configured grader."""
    graded = Graded()
    for spec in specs:
        if spec.name == "schema_valid" and schema is None:
            raise TuneloopError("metric schema_valid needs data.answer_schema")
        match spec.name:
            case "field_accuracy":
                _field_accuracy(graded, spec, references, answers, schema)
            case "classification":
                _classification(graded, spec, references, answers, schema)
            case "item_f1":
                _item_f1(graded, spec, references, answers)
            case "bleu" | "chrf":
                _corpus(graded, spec, references, answers)
            case "embedding_similarity":
                graded.add("embedding_similarity", graders.embedding_similarity(answers, references))
            case "judge" | "pairwise" | "preference_accuracy":
                continue  # these need the prompts and a model: the harness adds them (judge.py, preference.py)
            case _:
                _rowwise(graded, spec, references, answers, schema)
    return graded


def _rowwise(graded: Graded, spec: MetricConfig, references: list[str], answers: list[str], schema) -> None:
    score = {
        "exact_match": lambda a, r: graders.exact_match(a, r),
        "normalized_match": lambda a, r: graders.normalized_match(a, r),
        "regex": lambda a, r: graders.regex_match(a, spec.pattern or ""),
        "json_valid": lambda a, r: graders.json_valid(a),
        "schema_valid": lambda a, r: graders.schema_valid(a, schema),
        "rouge_l": lambda a, r: graders.rouge_l(a, r),
    }[spec.name]
    graded.add(metric_key(spec), [float(score(a, r)) for a, r in zip(answers, references)])


def _field_accuracy(graded: Graded, spec: MetricConfig, references: list[str], answers: list[str], schema) -> None:
    compared = spec.fields or (graders.categorical_fields(schema) if schema else None)
    matches = [graders.field_matches(a, r, compared) for a, r in zip(answers, references)]
    graded.add("field_accuracy", [None if not m else float(np.mean(list(m.values()))) for m in matches])
    names = list(dict.fromkeys(name for m in matches if m for name in m))
    for name in names:
        graded.add(f"field.{name}", [None if not m or name not in m else float(m[name]) for m in matches])


def _classification(graded: Graded, spec: MetricConfig, references: list[str], answers: list[str], schema) -> None:
    truth = [graders.extract_label(r, spec.field) for r in references]
    predicted = [graders.extract_label(a, spec.field) for a in answers]
    labels = [label.casefold() for label in spec.labels] if spec.labels else graders.enum_labels(schema, spec.field)
    labels = labels or sorted({t for t in truth if t is not None})
    prefix = spec.field or "label"
    graded.add(f"{prefix}.accuracy", classification.correct(truth, predicted))
    graded.statistics[f"{prefix}.macro_f1"] = classification.confusion_statistic(truth, predicted, labels)
    graded.classification[prefix] = {
        **classification.classify(truth, predicted, labels),
        "predicted": predicted,
        "reference": truth,
    }


def _item_f1(graded: Graded, spec: MetricConfig, references: list[str], answers: list[str]) -> None:
    counts = [graders.item_counts(a, r, spec.field, spec.keys) for a, r in zip(answers, references)]
    scores = [None if c is None else graders.item_scores(c) for c in counts]
    prefix = spec.field or "items"
    graded.add(f"{prefix}.f1", [None if s is None else s[2] for s in scores])
    graded.add(f"{prefix}.precision", [None if s is None else s[0] for s in scores])
    graded.add(f"{prefix}.recall", [None if s is None else s[1] for s in scores])


def _corpus(graded: Graded, spec: MetricConfig, references: list[str], answers: list[str]) -> None:
    if spec.name == "bleu":
        rows, score = graders.bleu_statistics(answers, references), graders.bleu_from_statistics
    else:
        rows, score = graders.chrf_statistics(answers, references), graders.chrf_from_statistics
    graded.statistics[spec.name] = Statistic(np.array(rows, dtype=float).reshape(len(answers), -1), per_resample(score))
