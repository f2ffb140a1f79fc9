"""LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer and PEFT, completion-only loss."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset, save_meta
from tuneloop.config import TrainConfig
from tuneloop.errors import TuneloopError
from tuneloop.models import load_model, load_tokenizer
from tuneloop.train.callbacks import CheckpointEachEpoch, RichProgress, StopOnNonFiniteLoss
from tuneloop.train.plot import plot_loss
from tuneloop.train.preflight import check_before_training


def train(cfg: TrainConfig, data: Dataset, base: BaseModelRef, run_dir: Path, resume: bool = False) -> Adapter:
    """Fine-tune a LoRA adapter on `data.train`, validating on `data.val`; write it under `run_dir/train`.
    With `resume`, continue from the newest checkpoint of an interrupted run."""
    import torch
    from transformers import EarlyStoppingCallback, PrinterCallback
    from trl import SFTTrainer

    out = run_dir / "train"
    check_before_training(cfg, base, out)
    checkpoints = out / "checkpoints"
    resume_from = _newest_checkpoint(checkpoints) if resume else None
    if resume and resume_from is None:
        raise TuneloopError(f"{checkpoints}: no checkpoint to resume from; run `tuneloop train` without --resume")
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)  # a fresh run never mixes with an old run's checkpoints

    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(base)
    model = load_model(base, _quantization(cfg))
    train_set = _prompt_completion(data.train)
    val_set = _prompt_completion(data.val) if data.counts.get("val") else None
    if len(train_set) == 0:
        raise TuneloopError(f"{data.train}: the training split is empty")
    if cfg.early_stopping_patience and val_set is None:
        raise TuneloopError("train.early_stopping_patience needs a validation split; set data.val_fraction above 0")

    steps = _total_steps(cfg, len(train_set))
    progress, non_finite = RichProgress(total_steps=steps), StopOnNonFiniteLoss()
    callbacks = [progress, non_finite, CheckpointEachEpoch()]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = SFTTrainer(
        model=model,
        args=_sft_args(cfg, checkpoints, steps, has_val=val_set is not None),
        train_dataset=train_set,
        eval_dataset=val_set,
        processing_class=tokenizer,
        peft_config=_lora_config(cfg),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # the rich bar shows the same numbers
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    if non_finite.bad_step is not None:
        kept = _newest_checkpoint(checkpoints)
        raise TuneloopError(
            f"training loss became {non_finite.bad_value} at step {non_finite.bad_step}; stopped. "
            f"Last good checkpoint: {kept or 'none yet'}. Lower train.learning_rate and run again"
        )
    val_loss = _final_val_loss(trainer) if val_set is not None else None

    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    history = _history(trainer.state.log_history)
    plot_loss(history, run_dir / "loss.png")
    adapter = Adapter(
        dir=adapter_dir,
        base_model=base.name,
        dataset_hash=data.hash,
        method=cfg.method,
        params=cfg.model_dump(mode="json"),
        history=history,
        train_loss=_mean_train_loss(history),
        val_loss=None if val_loss is None else float(val_loss),
        train_tokens=progress.tokens,
        train_seconds=round(seconds, 2),
    )
    save_meta(adapter, out)
    return adapter


def _newest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return found[-1] if found else None


def _quantization(cfg: TrainConfig):
    if cfg.method != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _mean_train_loss(history: list[dict[str, float]]) -> float:
    """Mean of the logged per-step losses; unlike the trainer's own figure it covers a resumed run whole."""
    losses = [h["loss"] for h in history if "loss" in h]
    return float(sum(losses) / len(losses)) if losses else float("nan")


def _prompt_completion(path: Path):
    """Rows as TRL's conversational prompt/completion form: the last assistant turn is the completion."""
    from datasets import Dataset as HFDataset

    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            messages = json.loads(line)["messages"]
            records.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return HFDataset.from_list(records)


def _total_steps(cfg: TrainConfig, rows: int) -> int:
    per_epoch = math.ceil(math.ceil(rows / cfg.batch_size) / cfg.gradient_accumulation)
    return cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))


def _sft_args(cfg: TrainConfig, output_dir: Path, steps: int, has_val: bool):
    """The single place where tuneloop's TrainConfig becomes TRL's SFTConfig."""
    import torch
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    eval_steps = cfg.eval_steps or max(1, steps // 4)
    early_stopping = bool(cfg.early_stopping_patience)
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a value below 1 as a ratio of all steps
        num_train_epochs=cfg.epochs,
        max_steps=steps,
        max_length=cfg.max_seq_length,
        completion_only_loss=cfg.completion_only_loss,
        train_sampling_strategy="group_by_length",  # less padding per batch
        eval_strategy="steps" if has_val else "no",
        eval_steps=eval_steps,
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN must reach StopOnNonFiniteLoss, not be averaged away
        save_strategy="steps",
        # Early stopping restores the best checkpoint, so it needs one at every validation.
        save_steps=eval_steps if early_stopping else cfg.save_steps,
        save_total_limit=2,
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss" if early_stopping else None,
        greater_is_better=False if early_stopping else None,
        report_to="none",
        disable_tqdm=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
    )


def _lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def _final_val_loss(trainer) -> float:
    """Validation loss after the last step, reusing the evaluation made at that step when there was one."""
    last = trainer.state.log_history[-2:]  # the final step's eval entry precedes the train summary
    for entry in last:
        if "eval_loss" in entry and entry.get("step") == trainer.state.global_step:
            return entry["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def _history(log_history: list[dict]) -> list[dict[str, float]]:
    """Per-step train loss, learning rate and grad norm, plus every validation loss, as plain numbers."""
    keep = ("loss", "learning_rate", "grad_norm", "eval_loss", "num_tokens")
    return [
        {"step": int(entry["step"]), **{k: float(entry[k]) for k in keep if k in entry}}
        for entry in log_history
        if "step" in entry and any(k in entry for k in ("loss", "eval_loss"))
    ]
