"""Training stage: a base model and a dataset in, a LoRA adapter out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset, save_meta
from tuneloop.config import TrainConfig
from tuneloop.errors import TuneloopError
from tuneloop.train.callbacks import SAVED, RelayLogs
from tuneloop.train.dpo import train_dpo
from tuneloop.train.loop import newest_checkpoint
from tuneloop.train.scoring import CheckpointScorer, ScoreCheckpoints
from tuneloop.train.sft import train as train_sft
from tuneloop.train.tracking import Tracking, TrainingRun

__all__ = ["SAVED", "CheckpointScorer", "Tracking", "newest_checkpoint", "train"]


def train(
    cfg: TrainConfig,
    data: Dataset,
    base: BaseModelRef,
    run_dir: Path,
    resume: bool = False,
    tracking: Tracking | None = None,
    score_checkpoint: CheckpointScorer | None = None,
    on_log: Callable[[int, int, dict], None] | None = None,
) -> Adapter:
    """Fine-tune a LoRA adapter on `data` (supervised, or DPO on preference pairs with `method: dpo`);
    write it under `run_dir/train`. With `resume`, continue from the newest checkpoint. With `tracking`,
    log the run to MLflow as it trains. With `score_checkpoint`, score the model at every validation and
    keep the best-scoring checkpoint as the adapter. `on_log` receives (step, total steps, the trainer's log)
    at every log: training loss each logging step, validation loss at each validation, and `{SAVED: True}`
    once a checkpoint is on disk."""
    if score_checkpoint is not None and not data.counts.get("val"):
        raise TuneloopError("eval.checkpoint_metric needs a validation split; set data.val_fraction above 0")
    scoring = ScoreCheckpoints(score_checkpoint) if score_checkpoint is not None else None
    tags = {"dataset_hash": data.hash, "base_model": base.name}
    run = TrainingRun(tracking, _params(cfg, data, base), tags) if tracking else None
    callbacks = [c for c in (scoring, run) if c is not None]  # the score first: the run logs it
    relay = [RelayLogs(on_log)] if on_log is not None else []
    engine = train_dpo if cfg.method == "dpo" else train_sft
    with run or nullcontext():
        adapter = engine(cfg, data, base, run_dir, resume=resume, callbacks=[*callbacks, *relay],
                         best_metric=score_checkpoint.key if score_checkpoint else None)
    if not callbacks:
        return adapter
    main = _main_process_once_all_are_done()
    adapter = dataclasses.replace(
        adapter,
        history=scoring.with_scores(adapter.history) if scoring else adapter.history,
        mlflow_run_id=run.run_id if run else None,
        checkpoint_metric=score_checkpoint.key if score_checkpoint else None,
        best_step=scoring.best_step if scoring else None,
    )
    if main:
        save_meta(adapter, run_dir / "train")
    return adapter


def _main_process_once_all_are_done() -> bool:
    """Whether this is the process that rewrites meta.json: the only one, or in a distributed run rank 0, once
    every process has written its own copy (only rank 0 logged the MLflow run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    dist.barrier()
    return dist.get_rank() == 0


def _params(cfg: TrainConfig, data: Dataset, base: BaseModelRef) -> dict:
    """The run's parameters, as `registry register` logs them for an adapter trained without tracking."""
    return {
        "base_model": base.name,
        "method": cfg.method,
        "dataset_hash": data.hash,
        **{f"train.{k}": v for k, v in cfg.model_dump(mode="json").items()},
        **{f"data.{k}": v for k, v in data.counts.items()},
    }
