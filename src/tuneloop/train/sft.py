"""Supervised fine-tuning (LoRA, QLoRA or all weights) with completion-only loss on padding-free packed
batches. The Hugging Face Trainer supplies checkpoints, resume, early stopping, mixed precision and
distributed launch; tuneloop supplies the batches and the loss, which computes the LM head only at the
positions that are trained."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from transformers import TrainerCallback

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset
from tuneloop.config import TrainConfig
from tuneloop.models import load_model, load_tokenizer
from tuneloop.train.loop import (
    budget_batch_size,
    check_splits,
    fit,
    lora_config,
    save,
    start,
    total_steps,
    trainer_arguments,
    trainer_callbacks,
)
from tuneloop.train.packing import ATTENTION, pack, pad_row, register_attention, split_rows
from tuneloop.train.template import IGNORE, encode_example


ROW_MULTIPLE = 64  # packed rows are lengthened to a multiple of this many tokens (see pad_row)
# What the per-step history keeps of the trainer's log, under tuneloop's names.
HISTORY_KEYS = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm", "eval_loss": "eval_loss",
                "num_input_tokens_seen": "num_tokens"}


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

    # 1. Everything that can fail cheaply fails before the model is loaded.
    out, checkpoints, resume_from = start(cfg, base, run_dir, resume)
    tokenizer = load_tokenizer(base)
    train_set = _encoded(data.train, tokenizer, cfg)
    val_set = _encoded(data.val, tokenizer, cfg) if data.counts.get("val") else None
    check_splits(cfg, data, train_set, val_set, checkpoints, resume)
    budgeted = budget_batch_size(cfg, [len(ids) for ids in train_set["input_ids"]])
    if budgeted.batch_size != cfg.batch_size:
        Console(stderr=True).print(f"batch_tokens {cfg.batch_tokens}: {budgeted.batch_size} rows per step, learning rate "
                                   f"{cfg.learning_rate:g} -> {budgeted.learning_rate:g} (scaled with the rows)")
    cfg = budgeted

    # 2. Train.
    torch.manual_seed(cfg.seed)
    model = _trainable_model(cfg, base)
    steps = total_steps(cfg, len(train_set))
    all_callbacks, progress, non_finite = trainer_callbacks(cfg, steps, callbacks)
    trainer = _completion_trainer(cfg.max_seq_length)(
        model=model,
        args=_training_args(cfg, checkpoints, steps, has_val=val_set is not None, best_metric=best_metric),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=pack,
        processing_class=tokenizer,
        callbacks=all_callbacks,
    )
    seconds, val_loss = fit(trainer, non_finite, checkpoints, resume_from, has_val=val_set is not None)

    # 3. Save what evaluation and serving load: plain SDPA attention, the adapter or the whole model.
    model.config._attn_implementation = "sdpa"
    saved_dir = out / ("model" if cfg.method == "full" else "adapter")
    return save(trainer, tokenizer, saved_dir, run_dir, cfg, data, base, HISTORY_KEYS, progress.tokens, seconds, val_loss)


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
    return get_peft_model(model, lora_config(cfg), autocast_adapter_dtype=True)


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
    from tuneloop.models import bf16_capable

    if precision != "auto":
        return precision == "bf16"
    return bf16_capable(on_gpu)


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
