"""LoRA preference tuning with TRL's DPOTrainer: the adapter learns to prefer each chosen answer over
its rejected one. The reference policy is the frozen base model with the adapter switched off, so no
second copy of the model is held in memory."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset, save_meta
from tuneloop.config import TrainConfig
from tuneloop.errors import TuneloopError
from tuneloop.models import load_model, load_tokenizer
from tuneloop.train.callbacks import CheckpointEachEpoch, RichProgress, StopOnNonFiniteLoss
from tuneloop.train.plot import plot_loss
from tuneloop.train.preflight import check_before_training
from tuneloop.train.sft import _lora_config, _newest_checkpoint, _total_steps, final_val_loss, trainer_arguments

# What the per-step history keeps of the trainer's log, under tuneloop's names.
HISTORY_KEYS = {
    "loss": "loss",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "num_tokens": "num_tokens",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
    "eval_loss": "eval_loss",
    "eval_rewards/margins": "eval_reward_margin",
}


def train_dpo(
    cfg: TrainConfig,
    data: Dataset,
    base: BaseModelRef,
    run_dir: Path,
    resume: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    best_metric: str | None = None,
) -> Adapter:
    """Train a LoRA adapter with DPO on the preference pairs of `data.train` (validating on `data.val`);
    write it under `run_dir/train`. With `resume`, continue from the newest checkpoint of an interrupted run.
    `callbacks` join the trainer's; `best_metric` names a validation metric (higher is better) whose best
    checkpoint is kept instead of the last."""
    import torch
    from transformers import EarlyStoppingCallback, PrinterCallback
    from trl import DPOTrainer

    # 1. Everything that can fail cheaply fails before the model is loaded.
    out = run_dir / "train"
    check_before_training(cfg, base, out)
    checkpoints = out / "checkpoints"
    resume_from = _newest_checkpoint(checkpoints) if resume else None
    if resume and resume_from is None:
        raise TuneloopError(f"{checkpoints}: no checkpoint to resume from; run `tuneloop train` without --resume")
    train_set = preference_pairs(data.train)
    val_set = preference_pairs(data.val) if data.counts.get("val") else None
    if len(train_set) == 0:
        raise TuneloopError(f"{data.train}: the training split is empty")
    if cfg.early_stopping_patience and val_set is None:
        raise TuneloopError("train.early_stopping_patience needs a validation split; set data.val_fraction above 0")
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)  # a fresh run never mixes with an old run's checkpoints

    # 2. Train. With a PEFT model and no ref_model, the trainer computes the reference log-probabilities
    # with the adapter disabled, i.e. from the untouched base weights.
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(base)
    model = load_model(base)
    steps = _total_steps(cfg, len(train_set))
    progress, non_finite = RichProgress(total_steps=steps), StopOnNonFiniteLoss()
    callbacks = [progress, non_finite, CheckpointEachEpoch(), *callbacks]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=_dpo_args(cfg, checkpoints, steps, has_val=val_set is not None, best_metric=best_metric),
        train_dataset=train_set,
        eval_dataset=val_set,
        processing_class=tokenizer,
        peft_config=_lora_config(cfg),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # the rich bar shows the same numbers
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    if non_finite.bad_step is not None:
        kept = _newest_checkpoint(checkpoints)
        raise TuneloopError(
            f"training loss became {non_finite.bad_value} at step {non_finite.bad_step}; stopped. "
            f"Last good checkpoint: {kept or 'none yet'}. Lower train.learning_rate and run again"
        )
    val_loss = final_val_loss(trainer) if val_set is not None else None

    # 3. The adapter, its loss curve and meta.json, as the SFT path writes them.
    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))  # every process; the first one writes
    history = _history(trainer.state.log_history)
    losses = [h["loss"] for h in history if "loss" in h]
    adapter = Adapter(
        dir=adapter_dir,
        base_model=base.name,
        dataset_hash=data.hash,
        method=cfg.method,
        params=cfg.model_dump(mode="json"),
        history=history,
        train_loss=float(sum(losses) / len(losses)) if losses else float("nan"),
        val_loss=None if val_loss is None else float(val_loss),
        train_tokens=progress.tokens,
        train_seconds=round(seconds, 2),
    )
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(adapter_dir))
        plot_loss(history, run_dir / "loss.png")
        save_meta(adapter, out)
    trainer.accelerator.wait_for_everyone()
    return adapter


def preference_pairs(path: Path):
    """Rows as TRL's conversational preference form: the prompt turns, the chosen last assistant turn,
    and the rejected answer as an assistant turn in its place."""
    from datasets import Dataset as HFDataset

    records, missing = [], 0
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if not row.get("rejected"):
                missing += 1
                continue
            messages = row["messages"]
            records.append(
                {
                    "prompt": messages[:-1],
                    "chosen": messages[-1:],
                    "rejected": [{"role": "assistant", "content": row["rejected"]}],
                }
            )
    if missing:
        raise TuneloopError(
            f"{path}: {missing} of {missing + len(records)} rows have no rejected answer; train.method=dpo needs "
            f"preference data (prompt/chosen/rejected rows, e.g. data.format: preference)"
        )
    return HFDataset.from_list(records)


def _dpo_args(cfg: TrainConfig, output_dir: Path, steps: int, has_val: bool, best_metric: str | None = None):
    """TrainConfig as TRL's DPOConfig: the arguments all methods share, plus DPO's own."""
    import torch
    from trl import DPOConfig

    on_gpu = torch.cuda.is_available()
    return DPOConfig(
        **trainer_arguments(cfg, output_dir, steps, has_val, best_metric),
        beta=cfg.dpo_beta,
        max_length=cfg.max_seq_length,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
    )


def _history(log_history: list[dict]) -> list[dict[str, float]]:
    """Per-step loss, learning rate, grad norm and reward margin/accuracy, plus every validation, as plain numbers."""
    return [
        {"step": int(entry["step"]), **{name: float(entry[key]) for key, name in HISTORY_KEYS.items() if key in entry}}
        for entry in log_history
        if "step" in entry and any(k in entry for k in ("loss", "eval_loss"))
    ]
