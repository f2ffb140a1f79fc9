"""Training stage: a base model and a dataset in, a LoRA adapter out."""

from __future__ import annotations

from pathlib import Path

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset
from tuneloop.config import TrainConfig
from tuneloop.train.dpo import train_dpo
from tuneloop.train.sft import train as train_sft

__all__ = ["train"]


def train(cfg: TrainConfig, data: Dataset, base: BaseModelRef, run_dir: Path, resume: bool = False) -> Adapter:
    """Fine-tune a LoRA adapter on `data` (supervised, or DPO on preference pairs with `method: dpo`);
    write it under `run_dir/train`. With `resume`, continue from the newest checkpoint."""
    if cfg.method == "dpo":
        return train_dpo(cfg, data, base, run_dir, resume=resume)
    return train_sft(cfg, data, base, run_dir, resume=resume)
