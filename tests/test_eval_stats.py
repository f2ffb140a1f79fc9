"""Paired bootstrap intervals and the gate decision, on hand-made per-row scores."""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.evaluate.classification import classify, confusion_statistic
from tuneloop.evaluate.gate import decide
from tuneloop.evaluate.stats import bootstrap, flips, mean_statistic


def test_interval_brackets_the_mean_and_is_reproducible():
    scores = [1.0] * 30 + [0.0] * 10
    base_ci, cand_ci, diff = bootstrap({"m": mean_statistic(scores)}, None, resamples=1000, seed=3)
    low, high = base_ci["m"]
    assert low < 0.75 < high and 0.55 < low and high < 0.9
    assert bootstrap({"m": mean_statistic(scores)}, None, 1000, 3)[0] == base_ci  # seeded
    assert cand_ci is None and diff is None


def test_difference_is_paired_so_a_constant_gain_has_a_tight_interval():
    base = np.random.default_rng(0).random(50).tolist()
    better = [b + 0.1 for b in base]
    _, _, diff = bootstrap({"m": mean_statistic(base)}, {"m": mean_statistic(better)}, 500, 0)
    assert diff["m"] == pytest.approx([0.1, 0.1, 0.1])  # unpaired resampling would spread this widely


def test_rows_where_a_metric_does_not_apply_are_left_out():
    stat = mean_statistic([1.0, None, 0.0, None])
    assert stat.value() == pytest.approx(0.5)


def test_macro_f1_statistic_matches_the_classification_report():
    labels = ["a", "b", "c"]
    truth = ["a", "a", "b", "b", "c", "c", "a"]
    predicted = ["a", "b", "b", "b", "zzz", "c", None]
    assert confusion_statistic(truth, predicted, labels).value() == pytest.approx(classify(truth, predicted, labels)["macro_f1"])


def test_flips_list_fixed_and_broken_rows():
    assert flips([0.0, 1.0, 1.0, 0.0, None], [1.0, 0.0, 1.0, 0.0, 1.0]) == {"fixed": [0], "broken": [1]}


def test_gate_needs_the_whole_interval_above_zero_against_every_opponent():
    assert decide(["m"], {"baseline": {"m": [0.2, 0.05, 0.3]}}) == []
    failures = decide(["m", "k"], {"baseline": {"m": [0.1, -0.02, 0.2], "k": [-0.3, -0.4, -0.2]}})
    assert [f.split(":")[0] for f in failures] == ["m", "k"]
    assert "-30.0 pts vs the baseline" in failures[1]
    assert decide(["m"], {"baseline": {"m": [0.2, 0.1, 0.3]}, "production": {"m": [0.0, -0.1, 0.1]}})[0].startswith(
        "m: +0.0 pts vs the production"
    )
