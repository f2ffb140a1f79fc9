"""Evaluation stage: the baseline and the fine-tune scored on the same held-out rows."""

from tuneloop.evaluate.harness import evaluate

__all__ = ["evaluate"]
