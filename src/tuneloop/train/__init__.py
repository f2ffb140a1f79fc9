"""Training stage: a base model and a dataset in, a LoRA adapter out."""

from tuneloop.train.sft import train

__all__ = ["train"]
