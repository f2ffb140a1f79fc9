"""LoRA preference tuning with TRL's DPOTrainer: the adapter learns to prefer each chosen answer over
its rejected one. The reference policy is the frozen base model with the adapter switched off, so no
second copy of the model is held in memory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset
from tuneloop.config import TrainConfig
from tuneloop.errors import TuneloopError
from tuneloop.models import load_model, load_tokenizer
from tuneloop.train.loop import check_splits, fit, lora_config, save, start, total_steps, trainer_arguments, trainer_callbacks

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
    from trl import DPOTrainer

    # 1. Everything that can fail cheaply fails before the model is loaded.
    out, checkpoints, resume_from = start(cfg, base, run_dir, resume)
    train_set = preference_pairs(data.train)
    val_set = preference_pairs(data.val) if data.counts.get("val") else None
    check_splits(cfg, data, train_set, val_set, checkpoints, resume)

    # 2. Train. With a PEFT model and no ref_model, the trainer computes the reference log-probabilities
    # with the adapter disabled, i.e. from the untouched base weights.
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(base)
    model = load_model(base)
    steps = total_steps(cfg, len(train_set))
    all_callbacks, progress, non_finite = trainer_callbacks(cfg, steps, callbacks)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=_dpo_args(cfg, checkpoints, steps, has_val=val_set is not None, best_metric=best_metric),
        train_dataset=train_set,
        eval_dataset=val_set,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
        callbacks=all_callbacks,
    )
    seconds, val_loss = fit(trainer, non_finite, checkpoints, resume_from, has_val=val_set is not None)

    # 3. The adapter, its loss curve and meta.json, as the SFT path writes them.
    return save(trainer, tokenizer, out / "adapter", run_dir, cfg, data, base, HISTORY_KEYS, progress.tokens,
                seconds, val_loss)


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
