"""Trainer callbacks: a rich progress bar (loss, tokens/s, ETA), a stop on NaN/inf loss, and a
checkpoint at every epoch's end."""

from __future__ import annotations

import math
import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback


class RichProgress(TrainerCallback):
    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.tokens = 0
        self._progress: Progress | None = None
        self._task = None
        self._started = 0.0
        self._loss = float("nan")
        self._val_loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return  # one bar per run, not one per process
        self._progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=self.total_steps, stats="")
        self._started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self._loss = float(logs["loss"])
        if "eval_loss" in logs:
            self._val_loss = float(logs["eval_loss"])
        for key in ("num_tokens", "num_input_tokens_seen"):  # TRL's name, the Trainer's name
            if key in logs:
                self.tokens = int(float(logs[key]))
        self._refresh(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._refresh(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._refresh(state.global_step)
            self._progress.stop()

    def _refresh(self, step: int) -> None:
        if self._progress is None:
            return
        rate = self.tokens / max(time.perf_counter() - self._started, 1e-9)
        val = f" val {self._val_loss:.3f}" if self._val_loss is not None else ""
        self._progress.update(self._task, completed=step, stats=f"loss {self._loss:.3f}{val} · {rate:,.0f} tok/s")


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first NaN/inf training loss, without checkpointing the broken state."""

    def __init__(self) -> None:
        self.bad_step: int | None = None
        self.bad_value: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.bad_step is None:
            self.bad_step, self.bad_value = state.global_step, float(loss)
            control.should_training_stop = True
            control.should_save = False


class CheckpointEachEpoch(TrainerCallback):
    """The trainer saves either every N steps or every epoch; tuneloop wants both."""

    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_save = True


SAVED = "checkpoint_saved"


class RelayLogs(TrainerCallback):
    """Hands every log the trainer writes (training loss, validation loss, learning rate) to `receive`
    with the step and the run's total steps, on the main process; and `{SAVED: True}` once a checkpoint's
    files are complete on disk (the trainer logs a step's validation loss before it saves the step)."""

    def __init__(self, receive) -> None:
        self.receive = receive

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.receive(state.global_step, state.max_steps, dict(logs))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.receive(state.global_step, state.max_steps, {SAVED: True})
