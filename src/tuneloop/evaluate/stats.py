"""Paired bootstrap confidence intervals, computed with numpy only.

Every metric is kept as per-row sufficient statistics (N, K) plus a function from their column sums to
the metric's value. A mean is (score, 1) per row; corpus BLEU/chrF keep sacrebleu's n-gram counts; a
macro-F1 keeps one cell of the confusion matrix per row. Resampling rows then only reweights the rows,
so the same resample serves the baseline and the candidate (a paired bootstrap) and every metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Statistic:
    rows: np.ndarray  # (N, K) per-row sufficient statistics
    reduce: Callable[[np.ndarray], np.ndarray]  # (B, K) column sums -> (B,) metric values

    def value(self) -> float:
        return float(self.reduce(self.rows.sum(axis=0, keepdims=True))[0])


def mean_statistic(values: list[float | None]) -> Statistic:
    """The mean of per-row scores; rows where the metric does not apply (None) are left out."""
    rows = np.array([[0.0, 0.0] if v is None else [float(v), 1.0] for v in values]).reshape(-1, 2)
    return Statistic(rows, _ratio)


def _ratio(sums: np.ndarray) -> np.ndarray:
    return np.divide(sums[:, 0], sums[:, 1], out=np.full(len(sums), np.nan), where=sums[:, 1] > 0)


def per_resample(score: Callable[[list[float]], float]) -> Callable[[np.ndarray], np.ndarray]:
    """Lift a scalar function of summed statistics (such as sacrebleu's) to a batch of resamples."""
    return lambda sums: np.array([score(row.tolist()) for row in sums])


def bootstrap(
    baseline: dict[str, Statistic],
    candidate: dict[str, Statistic] | None,
    resamples: int,
    seed: int,
    confidence: float = 0.95,
) -> tuple[dict[str, list[float]], dict[str, list[float]] | None, dict[str, list[float]] | None]:
    """Percentile intervals for each metric of the baseline and the candidate, and for the difference
    candidate - baseline as [difference, low, high], all from the same resampled row indices."""
    n = len(next(iter(baseline.values())).rows) if baseline else 0
    if n == 0:
        return {}, None if candidate is None else {}, None if candidate is None else {}
    weights = _resample_counts(n, resamples, seed)  # (B, N)
    tail = (1 - confidence) / 2 * 100
    base_ci, cand_ci, diff = {}, {}, {}
    for name, stat in baseline.items():
        b = stat.reduce(weights @ stat.rows)  # (B,)
        base_ci[name] = _interval(b, tail)
        if candidate is None or name not in candidate:
            continue
        c = candidate[name].reduce(weights @ candidate[name].rows)
        cand_ci[name] = _interval(c, tail)
        diff[name] = [candidate[name].value() - stat.value(), *_interval(c - b, tail)]
    return base_ci, (cand_ci if candidate is not None else None), (diff if candidate is not None else None)


def _resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """How often each row is drawn in each resample: (B, N), every row sums to N."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(picks.ravel(), minlength=resamples * n).reshape(resamples, n).astype(float)


def _interval(values: np.ndarray, tail: float) -> list[float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [float("nan"), float("nan")]
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(low), float(high)]


def flips(baseline: list[float | None], candidate: list[float | None]) -> dict[str, list[int]]:
    """Rows a pass/fail metric turned from fail to pass (fixed) and from pass to fail (broken)."""
    fixed = [i for i, (b, c) in enumerate(zip(baseline, candidate)) if b is not None and c is not None and b < 1 <= c]
    broken = [i for i, (b, c) in enumerate(zip(baseline, candidate)) if b is not None and c is not None and c < 1 <= b]
    return {"fixed": fixed, "broken": broken}
