"""Scoring every checkpoint while training: at each validation the model answers validation prompts and a
grader scores the answers; the best-scoring checkpoint, not the last one, becomes the adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from transformers import TrainerCallback


@dataclass(frozen=True)
class CheckpointScorer:
    """`score(model, tokenizer)` scores the model in its current state (higher is better); the score is
    reported as `eval_<name>`. The evaluation stage builds one from a grader (evaluate/checkpoint.py)."""

    name: str
    score: Callable[[Any, Any], float]

    @property
    def key(self) -> str:
        return f"eval_{self.name}"


class ScoreCheckpoints(TrainerCallback):
    """Adds the scorer's score to each validation's metrics. `on_evaluate` runs before the trainer compares
    checkpoints, so `metric_for_best_model` can name the score. Must come before the callbacks that read
    the metrics (early stopping, tracking)."""

    def __init__(self, scorer: CheckpointScorer) -> None:
        self.scorer = scorer
        self.scores: dict[int, float] = {}  # step -> score, including those before a resume
        self.best_step: int | None = None
        self._trained = False

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        if self._trained or metrics is None:
            return  # a validation after training (of the restored best model) picks nothing
        # Every process scores the same rows with the same weights, so they agree on the best checkpoint.
        was_training = model.training
        model.eval()
        try:
            score = float(self.scorer.score(model, processing_class))
        finally:
            model.train(was_training)
        metrics[self.scorer.key] = score
        entry = state.log_history[-1] if state.log_history else {}
        if entry.get("step") == state.global_step and "eval_loss" in entry:
            entry[self.scorer.key] = score  # kept in trainer_state.json of the checkpoint, for resume

    def on_train_end(self, args, state, control, **kwargs):
        self._trained = True
        self.scores = {int(e["step"]): float(e[self.scorer.key]) for e in state.log_history if self.scorer.key in e}
        restored = args.load_best_model_at_end and state.best_model_checkpoint is not None
        self.best_step = state.best_global_step if restored else None

    def with_scores(self, history: list[dict[str, float]]) -> list[dict[str, float]]:
        """The per-step history with each validation's score added to its entry."""
        return [
            {**h, self.scorer.key: self.scores[h["step"]]} if "eval_loss" in h and h["step"] in self.scores else h
            for h in history
        ]
