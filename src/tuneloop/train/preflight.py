"""Problems found before training starts rather than after an hour of it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import TrainConfig
from tuneloop.errors import TuneloopError

# Two checkpoints of adapter + Adam moments, the final adapter and slack: a small share of the base weights.
LORA_DISK_SHARE = 0.5
FULL_DISK_SHARE = 7.0
MIN_FREE_BYTES = 200 * 2**20


def check_before_training(cfg: TrainConfig, base: BaseModelRef, out: Path) -> None:
    """Raise a TuneloopError for a method this machine cannot run, an unwritable output directory,
    or too little free disk for checkpoints."""
    if cfg.method == "qlora":
        _check_qlora()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        raise TuneloopError(f"{out}: cannot write the training output there ({err.strerror})") from None
    weights = sum(f.stat().st_size for f in Path(base.path).glob("*.safetensors"))
    # A full fine-tune checkpoints the weights and two Adam moments, twice (two checkpoints are kept),
    # and saves the model once more at the end.
    share = FULL_DISK_SHARE if cfg.method == "full" else LORA_DISK_SHARE
    needed = max(int(weights * share), MIN_FREE_BYTES)
    free = shutil.disk_usage(out).free
    if free < needed:
        raise TuneloopError(
            f"{out}: {free / 2**20:,.0f} MiB free, training needs about {needed / 2**20:,.0f} MiB for checkpoints"
        )


def _check_qlora() -> None:
    import torch

    if not torch.cuda.is_available():
        raise TuneloopError(
            "train.method=qlora needs a CUDA GPU: bitsandbytes' 4-bit NF4 kernels do not run on a CPU; "
            "use method: lora here"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TuneloopError("train.method=qlora needs bitsandbytes: pip install bitsandbytes") from None
