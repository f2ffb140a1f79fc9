"""Input drift: do live prompts still look like the held-out prompts the model was evaluated on?

Two views, each a two-sample Kolmogorov–Smirnov test from scipy:
- embeddings: one KS test per all-MiniLM-L6-v2 dimension, Bonferroni-corrected over the dimensions
  (alibi-detect's KSDrift; Rabanser et al., "Failing Loudly", 2019);
- lengths: one KS test on prompt length in characters.
The views split `alpha` in two (Bonferroni again), so the chance of a false alarm when nothing
drifted is at most `alpha`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import ks_2samp

# The grader's cached model, so a process that both grades and monitors loads MiniLM once.
from tuneloop.evaluate.graders import embedding_model

# Below this many prompts on either side the KS tests have too little power to be worth a verdict.
MIN_PROMPTS = 20


@dataclass(frozen=True)
class DriftResult:
    """The verdict of `input_drift` and the numbers behind it."""

    drifted: bool
    alpha: float  # the stated overall false-alarm rate
    embedding_p_value: float  # Bonferroni-adjusted over dimensions: min p * dims, clipped to 1
    length_p_value: float
    reference_size: int
    live_size: int
    reference_median_length: float
    live_median_length: float
    embedding_drifted: bool = False  # embedding_p_value < alpha / 2
    length_drifted: bool = False  # length_p_value < alpha / 2
    reason: str | None = None  # why the tests were not run; None when they were


def prompt_length(text: str) -> int:
    """A prompt's length in characters, the unit `input_drift` compares."""
    return len(text)


def prompt_embeddings(texts: list[str]) -> np.ndarray:
    """(N, 384) all-MiniLM-L6-v2 embeddings of `texts`, L2-normalised."""
    model = embedding_model()
    if not texts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    return model.encode(texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)  # (N, 384)


def input_drift(
    reference_embeddings: np.ndarray,
    live_embeddings: np.ndarray,
    reference_lengths: Sequence[float],
    live_lengths: Sequence[float],
    alpha: float,
) -> DriftResult:
    """Whether live prompts drifted from the reference prompts, with overall false-alarm rate <= `alpha`.

    Each side's embeddings and lengths describe the same prompts, row for row. With fewer than
    `MIN_PROMPTS` prompts on either side no test is run: the result says `drifted=False`, its
    p-values are NaN and `reason` says why.

    The rate holds for one check with both samples drawn afresh. Checks against one fixed reference
    share its sampling noise, so their alarm rate over many windows sits above or below `alpha`
    depending on that reference; a reference several times the window size keeps it close.
    """
    reference = np.asarray(reference_embeddings, dtype=np.float64)  # (R, D)
    live = np.asarray(live_embeddings, dtype=np.float64)  # (L, D)
    ref_lengths = np.asarray(reference_lengths, dtype=np.float64)  # (R,)
    live_lengths_ = np.asarray(live_lengths, dtype=np.float64)  # (L,)
    _check_inputs(reference, live, ref_lengths, live_lengths_, alpha)

    described = dict(
        alpha=alpha,
        reference_size=len(reference),
        live_size=len(live),
        reference_median_length=_median(ref_lengths),
        live_median_length=_median(live_lengths_),
    )
    if min(len(reference), len(live)) < MIN_PROMPTS:
        return DriftResult(
            drifted=False,
            embedding_p_value=math.nan,
            length_p_value=math.nan,
            reason=f"not tested: needs at least {MIN_PROMPTS} prompts on each side, "
            f"got {len(reference)} reference and {len(live)} live",
            **described,
        )

    embedding_p = _embedding_p_value(reference, live)
    length_p = float(ks_2samp(ref_lengths, live_lengths_).pvalue)
    embedding_drifted = embedding_p < alpha / 2
    length_drifted = length_p < alpha / 2
    return DriftResult(
        drifted=embedding_drifted or length_drifted,
        embedding_p_value=embedding_p,
        length_p_value=length_p,
        embedding_drifted=embedding_drifted,
        length_drifted=length_drifted,
        **described,
    )


def _check_inputs(
    reference: np.ndarray, live: np.ndarray, ref_lengths: np.ndarray, live_lengths: np.ndarray, alpha: float
) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if reference.ndim != 2 or live.ndim != 2 or reference.shape[1] != live.shape[1]:
        raise ValueError(f"embeddings must be (N, D) with the same D, got {reference.shape} and {live.shape}")
    if len(ref_lengths) != len(reference) or len(live_lengths) != len(live):
        raise ValueError("each side needs one length per embedding row")


def _embedding_p_value(reference: np.ndarray, live: np.ndarray) -> float:
    # Equal to min(1, ks_2samp(reference, live, axis=0).pvalue.min() * D), but scipy loops over the
    # columns in Python (~50 ms for 384). Every column has the same sample sizes, so its p-value
    # falls as its KS statistic grows: the smallest p belongs to the largest statistic, and scipy
    # is asked for that one column only.
    column = int(np.argmax(_ks_statistics(reference, live)))
    p_value = ks_2samp(reference[:, column], live[:, column]).pvalue
    return min(1.0, float(p_value) * reference.shape[1])


def _ks_statistics(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    pooled = np.concatenate([a, b]).T.copy()  # (D, A+B), each dimension contiguous for the sort
    order = np.argsort(pooled, axis=1)
    values = np.take_along_axis(pooled, order, axis=1)
    seen_a = np.cumsum(order < len(a), axis=1)  # (D, A+B)
    seen_b = np.arange(1, pooled.shape[1] + 1) - seen_a
    gap = np.abs(seen_a / len(a) - seen_b / len(b))
    # Within a run of tied values both empirical CDFs are right only at the run's last position.
    run_ends = np.ones(gap.shape, dtype=bool)
    run_ends[:, :-1] = values[:, 1:] != values[:, :-1]
    return np.where(run_ends, gap, 0.0).max(axis=1)  # (D,)


def _median(values: np.ndarray) -> float:
    return float(np.median(values)) if len(values) else math.nan
