"""Classification metrics: accuracy, per-label precision/recall/F1, macro-F1 and the confusion matrix.

A prediction outside the label set (or no label at all) is wrong and counted in its own "(invalid)"
column, so a model that invents labels cannot hide them.
"""

from __future__ import annotations

import numpy as np

from tuneloop.evaluate.stats import Statistic

INVALID = "(invalid)"


def classify(references: list[str | None], predictions: list[str | None], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-label precision/recall/F1/support and the confusion matrix (rows: reference
    label, columns: predicted label then "(invalid)") of predicted against reference labels."""
    labels = _with_reference_labels(labels, references)
    confusion = confusion_statistic(references, predictions, labels).rows.sum(axis=0).reshape(len(labels), -1)
    precision, recall, f1 = _per_label(confusion[None])
    return {
        "labels": labels,
        "columns": [*labels, INVALID],
        "confusion": confusion.astype(int).tolist(),
        "accuracy": float(np.trace(confusion[:, : len(labels)]) / max(confusion.sum(), 1)),
        "macro_f1": float(_macro_f1(confusion.reshape(1, -1), len(labels))[0]),
        "per_label": {
            label: {
                "precision": float(precision[0, i]),
                "recall": float(recall[0, i]),
                "f1": float(f1[0, i]),
                "support": int(confusion[i].sum()),
            }
            for i, label in enumerate(labels)
        },
    }


def confusion_statistic(references: list[str | None], predictions: list[str | None], labels: list[str]) -> Statistic:
    """Macro-F1 as a bootstrap statistic: each row is a one-hot cell of the (L, L + 1) confusion matrix."""
    labels = _with_reference_labels(labels, references)
    width = len(labels) + 1
    rows = np.zeros((len(references), len(labels) * width))
    for i, (ref, pred) in enumerate(zip(references, predictions)):
        if ref is None:
            continue  # a reference without a label: the metric does not apply to this row
        column = labels.index(pred) if pred in labels else len(labels)
        rows[i, labels.index(ref) * width + column] = 1.0
    return Statistic(rows, lambda sums: _macro_f1(sums, len(labels)))


def correct(references: list[str | None], predictions: list[str | None]) -> list[float | None]:
    """Per-row accuracy: 1 when the predicted label is the reference label."""
    return [None if ref is None else float(pred == ref) for ref, pred in zip(references, predictions)]


def _with_reference_labels(labels: list[str], references: list[str | None]) -> list[str]:
    extra = [r for r in dict.fromkeys(references) if r is not None and r not in labels]
    return [*labels, *extra]


def _per_label(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, L, L + 1) confusion matrices -> precision, recall, F1, each (B, L); 0 where undefined."""
    n = confusion.shape[1]
    tp = np.diagonal(confusion[:, :, :n], axis1=1, axis2=2)  # (B, L)
    predicted = confusion[:, :, :n].sum(axis=1)  # (B, L) column sums over valid predictions
    actual = confusion.sum(axis=2)  # (B, L) row sums, invalid predictions included
    precision = np.divide(tp, predicted, out=np.zeros_like(tp, dtype=float), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp, dtype=float), where=actual > 0)
    f1 = np.divide(2 * tp, predicted + actual, out=np.zeros_like(tp, dtype=float), where=predicted + actual > 0)
    return precision, recall, f1


def _macro_f1(sums: np.ndarray, n_labels: int) -> np.ndarray:
    """(B, L * (L + 1)) summed one-hot cells -> (B,) macro-F1 over the labels that occur as reference
    or prediction in that sample (labels absent from both say nothing about the model)."""
    confusion = sums.reshape(len(sums), n_labels, n_labels + 1)
    _, _, f1 = _per_label(confusion)
    present = (confusion[:, :, :n_labels].sum(axis=1) + confusion.sum(axis=2)) > 0  # (B, L)
    counted = present.sum(axis=1)
    return np.divide((f1 * present).sum(axis=1), counted, out=np.full(len(sums), np.nan), where=counted > 0)
