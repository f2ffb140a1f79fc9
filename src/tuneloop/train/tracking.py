"""The training run on MLflow, logged while it trains: params at the start, every step's loss, learning
rate and grad norm, every validation's metrics, and the run's end (FAILED when training raises)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from transformers import TrainerCallback

# MLflow would otherwise send usage telemetry from every user's machine.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

FLUSH_SECONDS = 5.0  # buffered metrics reach the store at least this often, and at every validation


@dataclass(frozen=True)
class Tracking:
    """Where the training run is logged: an MLflow tracking URI, an experiment in it, and the run's name."""

    uri: str
    experiment_id: str
    run_name: str


class TrainingRun(TrainerCallback):
    """Logs one training run to MLflow from the main process. Use it as a context manager around the
    training too: leaving the block ends the run, FAILED (KILLED on Ctrl-C) when an exception escapes."""

    def __init__(self, tracking: Tracking, params: dict[str, Any], tags: dict[str, str]) -> None:
        self.tracking = tracking
        self.params = params
        self.tags = tags
        self.run_id: str | None = None
        self._client = None
        self._pending: list = []
        self._flushed = 0.0
        self._warned = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.run_id is not None:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._client = MlflowClient(tracking_uri=self.tracking.uri, registry_uri=self.tracking.uri)
        run = self._client.create_run(self.tracking.experiment_id, run_name=self.tracking.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        self._client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in self.params.items()])
        for entry in state.log_history:  # a resumed run: the steps before the interruption
            self._add(entry, int(entry.get("step", 0)))
        self._flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run_id is not None and logs and "loss" in logs:  # a training step; validations come in on_evaluate
            self._add(logs, state.global_step)
            if time.monotonic() - self._flushed > FLUSH_SECONDS:
                self._flush()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # Callbacks before this one (checkpoint scoring) have added their metrics by now.
        if self.run_id is not None and metrics:
            self._add({k: v for k, v in metrics.items() if k.startswith("eval_")}, state.global_step)
            self._flush()

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.run_id is None:
            return
        self._flush()
        status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as err:
            self._warn(err)

    def _add(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [
            Metric(key, float(value), now, step)
            for key, value in values.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        ]

    def _flush(self) -> None:
        try:
            for start in range(0, len(self._pending), 900):  # MLflow caps one batch at 1000 metrics
                self._client.log_batch(self.run_id, metrics=self._pending[start : start + 900])
        except Exception as err:  # MLflow raises many store-specific errors; a lost metric must not stop training
            self._warn(err)
        self._pending = []
        self._flushed = time.monotonic()

    def _warn(self, err: Exception) -> None:
        if not self._warned:
            Console(stderr=True).print(
                f"[yellow]MLflow: could not log to run {self.run_id} ({type(err).__name__}: {str(err)[:200]}); "
                "the training itself is not affected[/yellow]"
            )
        self._warned = True
