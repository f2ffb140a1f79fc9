"""The promotion gate: a candidate is promoted only when it is better with confidence, not by luck."""

from __future__ import annotations

import math


def decide(gate_metrics: list[str], differences: dict[str, dict[str, list[float]]]) -> list[str]:
    """The failures of the gate, one line each (empty: the candidate passes). `differences` maps each
    opponent ("baseline", the few-shot baseline, "production") to {metric: [candidate - opponent,
    low, high]}; the candidate must beat every opponent on every gate metric with the whole 95 % interval of
    the difference above zero."""
    failures = []
    for opponent, diff in differences.items():
        for metric in gate_metrics:
            if metric not in diff:
                failures.append(f"{metric}: not measured for both the candidate and the {opponent}")
                continue
            delta, low, high = diff[metric]
            if not (math.isfinite(low) and low > 0):
                failures.append(
                    f"{metric}: {_pts(delta)} vs the {opponent} (95 % CI of the difference "
                    f"[{_pts(low)}, {_pts(high)}]); the whole interval must lie above 0"
                )
    return failures


def _pts(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value * 100:+.1f} pts"
