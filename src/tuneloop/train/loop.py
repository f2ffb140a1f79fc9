"""What every training method does around its Hugging Face Trainer: checkpoints and resume, the
callbacks, the run itself with its NaN stop, and the adapter with its history, loss plot and meta.json."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset, save_meta
from tuneloop.config import TrainConfig
from tuneloop.errors import TuneloopError
from tuneloop.train.callbacks import CheckpointEachEpoch, RichProgress, StopOnNonFiniteLoss
from tuneloop.train.plot import plot_loss
from tuneloop.train.preflight import check_before_training


def start(cfg: TrainConfig, base: BaseModelRef, run_dir: Path, resume: bool) -> tuple[Path, Path, Path | None]:
    """Pre-flight checks; the output and checkpoint directories, and the checkpoint to resume from."""
    out = run_dir / "train"
    check_before_training(cfg, base, out)
    checkpoints = out / "checkpoints"
    resume_from = newest_checkpoint(checkpoints) if resume else None
    if resume and resume_from is None:
        raise TuneloopError(f"{checkpoints}: no checkpoint to resume from; run `tuneloop train` without --resume")
    return out, checkpoints, resume_from


def check_splits(cfg: TrainConfig, data: Dataset, train_set, val_set, checkpoints: Path, resume: bool) -> None:
    """Refuse an empty training split or early stopping without validation; then, unless resuming, clear
    the checkpoints an earlier run left."""
    if len(train_set) == 0:
        raise TuneloopError(f"{data.train}: the training split is empty")
    if cfg.early_stopping_patience and val_set is None:
        raise TuneloopError("train.early_stopping_patience needs a validation split; set data.val_fraction above 0")
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)  # a fresh run never mixes with an old run's checkpoints


def trainer_callbacks(
    cfg: TrainConfig, steps: int, extra: Sequence[TrainerCallback]
) -> tuple[list[TrainerCallback], RichProgress, StopOnNonFiniteLoss]:
    """The progress bar, the NaN stop, a checkpoint per epoch, `extra`, and early stopping when asked for."""
    from transformers import EarlyStoppingCallback

    progress, non_finite = RichProgress(total_steps=steps), StopOnNonFiniteLoss()
    callbacks = [progress, non_finite, CheckpointEachEpoch(), *extra]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    return callbacks, progress, non_finite


def fit(trainer, non_finite: StopOnNonFiniteLoss, checkpoints: Path, resume_from: Path | None,
        has_val: bool) -> tuple[float, float | None]:
    """Train; the seconds it took and the final validation loss. A non-finite loss is a clear error."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the rich bar shows the same numbers
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    if non_finite.bad_step is not None:
        kept = newest_checkpoint(checkpoints)
        raise TuneloopError(
            f"training loss became {non_finite.bad_value} at step {non_finite.bad_step}; stopped. "
            f"Last good checkpoint: {kept or 'none yet'}. Lower train.learning_rate and run again"
        )
    return seconds, final_val_loss(trainer) if has_val else None


def save(
    trainer, tokenizer, saved_dir: Path, run_dir: Path, cfg: TrainConfig, data: Dataset, base: BaseModelRef,
    history_keys: dict[str, str], tokens: int, seconds: float, val_loss: float | None,
) -> Adapter:
    """Save the trained weights to `saved_dir` and describe them; the first process writes the tokenizer,
    loss.png and meta.json. `history_keys` maps the trainer's log names to the history's."""
    trainer.save_model(str(saved_dir))  # every process: sharded weights are gathered here; the first one writes
    history = _history(trainer.state.log_history, history_keys)
    losses = [h["loss"] for h in history if "loss" in h]
    adapter = Adapter(
        dir=saved_dir,
        base_model=base.name,
        dataset_hash=data.hash,
        method=cfg.method,
        params=cfg.model_dump(mode="json"),
        history=history,
        # Unlike the trainer's own figure, the mean of the logged losses covers a resumed run whole.
        train_loss=float(sum(losses) / len(losses)) if losses else float("nan"),
        val_loss=None if val_loss is None else float(val_loss),
        train_tokens=tokens,
        train_seconds=round(seconds, 2),
    )
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(saved_dir))
        plot_loss(history, run_dir / "loss.png")
        save_meta(adapter, run_dir / "train")
    trainer.accelerator.wait_for_everyone()
    return adapter


def trainer_arguments(
    cfg: TrainConfig, output_dir: Path, steps: int, has_val: bool, best_metric: str | None = None
) -> dict:
    """The Trainer arguments every tuneloop method shares: batch, schedule, validation, checkpoints, logging."""
    eval_steps = cfg.eval_steps or max(1, steps // 4)
    best = best_metric or ("eval_loss" if cfg.early_stopping_patience else None)
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a value below 1 as a ratio of all steps
        num_train_epochs=cfg.epochs,
        max_steps=steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=eval_steps,
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN must reach StopOnNonFiniteLoss, not be averaged away
        save_strategy="steps",
        # Early stopping and a checkpoint metric restore the best checkpoint, so they need one at every validation.
        save_steps=eval_steps if best else cfg.save_steps,
        save_total_limit=2,
        load_best_model_at_end=best is not None,
        metric_for_best_model=best,
        greater_is_better=None if best is None else best != "eval_loss",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
    )


def final_val_loss(trainer) -> float:
    """Validation loss after the last step, reusing the evaluation made at that step when there was one."""
    last = trainer.state.log_history[-2:]  # the final step's eval entry precedes the train summary
    for entry in last:
        if "eval_loss" in entry and entry.get("step") == trainer.state.global_step:
            return entry["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def _history(log_history: list[dict], keys: dict[str, str]) -> list[dict[str, float]]:
    """Every step's and every validation's logged figures under `keys`' names, as plain numbers."""
    return [
        {"step": int(entry["step"]), **{ours: float(entry[k]) for k, ours in keys.items() if k in entry}}
        for entry in log_history
        if "step" in entry and any(k in entry for k in ("loss", "eval_loss"))
    ]


def newest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint: one whose trainer state was written, which the Trainer writes last
    (a process killed while saving leaves a checkpoint without it)."""
    found = sorted((p for p in directory.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                   key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return found[-1] if found else None


def budget_batch_size(cfg: TrainConfig, row_tokens: list[int]) -> TrainConfig:
    """`cfg` with batch_size raised to the rows `batch_tokens` holds at the rows' mean length (unchanged
    without a budget, or where the rows are long enough that batch_size rows fill it), and the learning
    rate raised in proportion (the linear scaling rule): an epoch then has fewer updates, each from more
    rows, and at the configured rate it would train less far (benchmarks/RESULTS.md, short rows)."""
    if cfg.batch_tokens is None or not row_tokens or cfg.method == "dpo":
        return cfg
    rows = int(cfg.batch_tokens * len(row_tokens) // sum(row_tokens))
    if rows <= cfg.batch_size:
        return cfg
    return cfg.model_copy(update={"batch_size": rows, "learning_rate": cfg.learning_rate * rows / cfg.batch_size})


def total_steps(cfg: TrainConfig, rows: int) -> int:
    # Each process of a distributed run takes its own batches; `tuneloop train` sets num_processes for them.
    per_epoch = math.ceil(math.ceil(rows / (cfg.batch_size * (cfg.num_processes or 1))) / cfg.gradient_accumulation)
    return cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
