"""How one served version did over a window of logged requests: volume, errors, latency, answers that
validate against its schema, refusals, and prompt, answer and label distributions against the training data."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import chi2_contingency, ks_2samp

from tuneloop.data.clean import REFUSAL
from tuneloop.evaluate.graders import extract_label, schema_valid


@dataclass(frozen=True)
class TrainingProfile:
    """What the live traffic is compared with: the training split's prompts and answers, the held-out
    (val + test) prompts, and per label field the training labels."""

    prompts: list[str]
    answers: list[str]
    held_out_prompts: list[str]
    labels: dict[str, list[str]]  # field ("" for the whole answer) -> one label per training row


def last_user_message(prompt: list[dict[str, str]] | str) -> str:
    """The text a request asked about: its last user message (the system prompt is the same everywhere)."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def version_quality(rows: list[dict[str, Any]], schema: dict | None, profile: TrainingProfile) -> dict[str, Any]:
    """Figures for one version's rows (all arrived in the window); content figures use the sampled rows."""
    answered = [r for r in rows if r["status"] == 200]
    latencies = np.array([r["latency_ms"] for r in answered], dtype=float)
    kept = [r for r in answered if r["answer"] is not None and r["prompt"] is not None]
    answers = [r["answer"] for r in kept]
    prompts = [last_user_message(r["prompt"]) for r in kept]
    stats: dict[str, Any] = {
        "volume": len(rows),
        "answered": len(answered),
        "errors": sum(r["status"] >= 500 for r in rows),
        "error_rate": _share(sum(r["status"] >= 500 for r in rows), len(rows)),
        "abandoned": sum(r["status"] == 499 for r in rows),
        "latency_p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
        "latency_p95_ms": float(np.percentile(latencies, 95)) if len(latencies) else None,
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        "with_content": len(kept),
        "schema_valid": _share(sum(schema_valid(a, schema) for a in answers), len(answers)) if schema else None,
        "refusal_share": _share(sum(REFUSAL.match(a) is not None for a in answers), len(answers)),
        "prompt_length": _lengths_against([len(p) for p in prompts], [len(p) for p in profile.prompts]),
        "answer_length": _lengths_against([len(a) for a in answers], [len(a) for a in profile.answers]),
        "labels": {
            name: _labels_against([extract_label(a, name or None) or "(none)" for a in answers], training)
            for name, training in profile.labels.items()
        },
    }
    return stats


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _lengths_against(live: list[int], training: list[int]) -> dict[str, Any]:
    """Medians, and the two-sample KS test of live lengths (characters) against training lengths."""
    figures: dict[str, Any] = {"live": live, "training_median": float(np.median(training)) if training else None,
                               "live_median": float(np.median(live)) if live else None, "p_value": None}
    if len(live) >= 5 and len(training) >= 5:
        figures["p_value"] = float(ks_2samp(live, training).pvalue)
    return figures


def _labels_against(live: list[str | None], training: list[str]) -> dict[str, Any]:
    """Each label's share in training and live, and the chi-squared test of the two distributions (labels
    training never saw count as one `(other)` column; answers without a label as `(none)`)."""
    known = sorted(set(training))
    live_counts = Counter(label if label in known or label == "(none)" else "(other)" for label in live)
    train_counts = Counter(training)
    columns = known + [c for c in ("(none)", "(other)") if c not in known and live_counts[c]]
    table = np.array([[train_counts[c] for c in columns], [live_counts[c] for c in columns]])
    p_value = None
    nonzero = table[:, table.sum(axis=0) > 0]
    if len(live) >= 5 and nonzero.shape[1] >= 2:
        p_value = float(chi2_contingency(nonzero).pvalue)
    return {
        "training": {c: _share(train_counts[c], len(training)) for c in columns},
        "live": {c: _share(live_counts[c], len(live)) for c in columns},
        "p_value": p_value,
    }


def training_profile(
    train: list[list[dict[str, str]]], held_out: list[list[dict[str, str]]], schema: dict | None
) -> TrainingProfile:
    """The profile of a dataset from its rows' messages (train split; val + test as held out). Label fields:
    the answer schema's fields with a closed set of values, or the whole answer when the answers are a small
    set of labels (a classifier)."""
    from tuneloop.data.load import Row
    from tuneloop.data.split import labels_of

    answers = [row[-1]["content"] for row in train]
    fields = [name for name, spec in (schema or {}).get("properties", {}).items() if "enum" in spec]
    if fields:
        labels = {name: [extract_label(a, name) or "(none)" for a in answers] for name in fields}
    else:
        whole = labels_of([Row("", row) for row in train], None)
        labels = {"": [extract_label(a, None) or "(none)" for a in answers]} if whole else {}
    return TrainingProfile(
        prompts=[last_user_message(row[:-1]) for row in train],
        answers=answers,
        held_out_prompts=[last_user_message(row[:-1]) for row in held_out],
        labels=labels,
    )
