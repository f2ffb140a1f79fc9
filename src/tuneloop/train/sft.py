"""Supervised fine-tuning (LoRA, QLoRA or all weights) with completion-only loss on padding-free packed
batches. The Hugging Face Trainer supplies checkpoints, resume, early stopping, mixed precision and
distributed launch; tuneloop supplies the batches and the loss, which computes the LM head only at the
positions that are trained."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from transformers import TrainerCallback

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset, save_meta
from tuneloop.config import TrainConfig
from tuneloop.errors import TuneloopError
from tuneloop.models import load_model, load_tokenizer
from tuneloop.train.callbacks import CheckpointEachEpoch, RichProgress, StopOnNonFiniteLoss
from tuneloop.train.packing import ATTENTION, pack, pad_row, register_attention, split_rows
from tuneloop.train.plot import plot_loss
from tuneloop.train.preflight import check_before_training
from tuneloop.train.template import IGNORE, encode_example


ROW_MULTIPLE = 64  # packed rows are lengthened to a multiple of this many tokens (see pad_row)


def train(
    cfg: TrainConfig,
    data: Dataset,
    base: BaseModelRef,
    run_dir: Path,
    resume: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    best_metric: str | None = None,
) -> Adapter:
    """Fine-tune on `data.train`, validating on `data.val`; write the adapter (or, with `method: full`,
    the whole model) under `run_dir/train`. With `resume`, continue from the newest checkpoint of an
    interrupted run. `callbacks` join the trainer's; `best_metric` names a validation metric (higher is
    better) whose best checkpoint is kept instead of the last."""
    import torch
    from transformers import EarlyStoppingCallback, PrinterCallback

    # 1. Everything that can fail cheaply fails before the model is loaded.
    out = run_dir / "train"
    check_before_training(cfg, base, out)
    checkpoints = out / "checkpoints"
    resume_from = _newest_checkpoint(checkpoints) if resume else None
    if resume and resume_from is None:
        raise TuneloopError(f"{checkpoints}: no checkpoint to resume from; run `tuneloop train` without --resume")
    tokenizer = load_tokenizer(base)
    train_set = _encoded(data.train, tokenizer, cfg)
    val_set = _encoded(data.val, tokenizer, cfg) if data.counts.get("val") else None
    if len(train_set) == 0:
        raise TuneloopError(f"{data.train}: the training split is empty")
    if cfg.early_stopping_patience and val_set is None:
        raise TuneloopError("train.early_stopping_patience needs a validation split; set data.val_fraction above 0")
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)  # a fresh run never mixes with an old run's checkpoints

    # 2. Train.
    torch.manual_seed(cfg.seed)
    model = _trainable_model(cfg, base)
    steps = _total_steps(cfg, len(train_set))
    progress, non_finite = RichProgress(total_steps=steps), StopOnNonFiniteLoss()
    callbacks = [progress, non_finite, CheckpointEachEpoch(), *callbacks]
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = _completion_trainer(cfg.max_seq_length)(
        model=model,
        args=_training_args(cfg, checkpoints, steps, has_val=val_set is not None, best_metric=best_metric),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=pack,
        processing_class=tokenizer,
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

    # 3. Save what evaluation and serving load: plain SDPA attention, the adapter or the whole model.
    model.config._attn_implementation = "sdpa"
    adapter_dir = out / ("model" if cfg.method == "full" else "adapter")
    trainer.save_model(str(adapter_dir))  # every process: sharded weights are gathered here; the first one writes
    history = _history(trainer.state.log_history)
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
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(adapter_dir))
        plot_loss(history, run_dir / "loss.png")
        save_meta(adapter, out)
    trainer.accelerator.wait_for_everyone()
    return adapter


def _encoded(path: Path, tokenizer, cfg: TrainConfig):
    """The split's rows tokenized with completion-only labels; rows cut at max_seq_length are counted
    and reported, never cut silently."""
    from datasets import Dataset as HFDataset

    records, truncated = [], 0
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            example = encode_example(tokenizer, json.loads(line)["messages"], cfg.max_seq_length, cfg.completion_only_loss)
            truncated += example.truncated
            records.append({"input_ids": example.input_ids, "labels": example.labels})
    if truncated:
        Console(stderr=True).print(
            f"[yellow]{path}: {truncated} of {len(records)} rows are longer than train.max_seq_length="
            f"{cfg.max_seq_length} tokens; their ends are cut off in training[/yellow]"
        )
    return HFDataset.from_list(records)


def _trainable_model(cfg: TrainConfig, base: BaseModelRef):
    """The base model with packed-batch attention, wrapped with a LoRA adapter unless `method: full`.
    Under bf16 a LoRA base is held in bf16: its weights are frozen, so nothing is lost by not keeping fp32
    masters, and neither the weights nor the saved activations are cast again at every step. The adapter's
    own weights stay fp32."""
    import torch

    register_attention()
    model = load_model(base, _quantization(cfg))
    model.set_attn_implementation(ATTENTION)
    if cfg.method == "full":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif _bf16(torch.cuda.is_available(), cfg.precision):
        model = model.to(torch.bfloat16)
    return get_peft_model(model, _lora_config(cfg), autocast_adapter_dtype=True)


def _completion_trainer(row_tokens: int):
    """The Trainer with tuneloop's loss: cross-entropy only at trained positions, from logits computed only
    there — on short answers after long prompts, most of the LM head's work and memory is skipped. A step's
    packed batch runs as rows of at most `row_tokens` tokens, one after another."""
    from contextlib import nullcontext

    import torch.nn.functional as F
    from transformers import Trainer

    class CompletionTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            rows = split_rows(inputs, row_tokens)
            if num_items_in_batch is None:  # each row's loss must be a share of the whole step's
                num_items_in_batch = (inputs["shift_labels"] != IGNORE).sum()
            loss = 0.0
            for i, row in enumerate(rows):
                # Gradients are synchronised across processes once, after the step's last row.
                last = i == len(rows) - 1
                with nullcontext() if last else self.accelerator.no_sync(model):
                    loss = loss + super().training_step(model, row, num_items_in_batch)
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            batch = pad_row(dict(inputs), ROW_MULTIPLE)
            targets = batch.pop("shift_labels")[0]  # (T,)
            batch.pop("labels")
            trained = (targets != IGNORE).nonzero().squeeze(-1)  # (N,)
            outputs = model(**batch, logits_to_keep=trained, use_cache=False)
            loss = F.cross_entropy(outputs.logits[0].float(), targets[trained], reduction="sum")  # logits (N, V)
            if num_items_in_batch is None:
                loss = loss / max(len(trained), 1)
            else:
                # num_items_in_batch counts every process's trained tokens, and DDP averages the gradients.
                loss = loss / num_items_in_batch * (self.accelerator.num_processes if self.args.average_tokens_across_devices else 1)
            return (loss, outputs) if return_outputs else loss

    return CompletionTrainer


def _bf16(on_gpu: bool, precision: str) -> bool:
    import torch

    if precision != "auto":
        return precision == "bf16"
    if on_gpu:
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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


def _total_steps(cfg: TrainConfig, rows: int) -> int:
    # Each process of a distributed run takes its own batches; `tuneloop train` sets num_processes for them.
    per_epoch = math.ceil(math.ceil(rows / (cfg.batch_size * (cfg.num_processes or 1))) / cfg.gradient_accumulation)
    return cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))


def _training_args(cfg: TrainConfig, output_dir: Path, steps: int, has_val: bool, best_metric: str | None = None):
    """The single place where tuneloop's TrainConfig becomes the Trainer's arguments."""
    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        **trainer_arguments(cfg, output_dir, steps, has_val, best_metric),
        activation_checkpointing=cfg.gradient_checkpointing,
        bf16=_bf16(on_gpu, cfg.precision),
        use_cpu=not on_gpu,
        remove_unused_columns=False,  # the packing collator needs `labels`, which the model never sees
        ddp_find_unused_parameters=False,  # every parameter that trains is used at every step
        include_num_input_tokens_seen="all",  # packed batches hold no padding: all input tokens are real
    )


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


def _lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def final_val_loss(trainer) -> float:
    """Validation loss after the last step, reusing the evaluation made at that step when there was one."""
    last = trainer.state.log_history[-2:]  # the final step's eval entry precedes the train summary
    for entry in last:
        if "eval_loss" in entry and entry.get("step") == trainer.state.global_step:
            return entry["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def _history(log_history: list[dict]) -> list[dict[str, float]]:
    """Per-step train loss, learning rate and grad norm, plus every validation loss, as plain numbers."""
    keep = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm", "eval_loss": "eval_loss",
            "num_input_tokens_seen": "num_tokens"}
    return [
        {"step": int(entry["step"]), **{ours: float(entry[k]) for k, ours in keep.items() if k in entry}}
        for entry in log_history
        if "step" in entry and any(k in entry for k in ("loss", "eval_loss"))
    ]
