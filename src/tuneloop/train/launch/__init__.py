"""Training with several processes: `tuneloop train` runs itself again under `accelerate launch`, with
the accelerate config shipped beside this file for the chosen `train.distributed`. Every process runs
the same recipe on its share of each batch; the first one writes the results."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from tuneloop.config import TrainConfig
from tuneloop.errors import TuneloopError

CONFIG_DIR = Path(__file__).parent  # ddp.yaml, deepspeed-zero2.yaml, deepspeed-zero3.yaml, fsdp.yaml
CPU_PROCESSES = 2  # the default on a machine without a GPU, where distributed runs are for trying out


def launch(cfg: TrainConfig, cli_args: list[str]) -> None:
    """Run `tuneloop <cli_args>` in `cfg.num_processes` processes under `accelerate launch` and wait for
    them. Raise a TuneloopError when this machine cannot run `cfg.distributed` or a process fails."""
    command = launch_command(cfg, cli_args)
    _release_gpu_memory()  # `tuneloop run` evaluated the baseline in this process
    finished = subprocess.run(command, check=False)
    if finished.returncode != 0:
        raise TuneloopError(
            f"distributed training (train.distributed={cfg.distributed}) failed with exit status "
            f"{finished.returncode}; the processes' own errors are printed above"
        )


def launch_command(cfg: TrainConfig, cli_args: list[str]) -> list[str]:
    """`accelerate launch` of `python -m tuneloop.cli <cli_args>` with the shipped config; the processes get
    the resolved process count, so each knows its share of the batches."""
    processes = _processes(cfg)
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIG_DIR / f"{cfg.distributed}.yaml"),
        "--num_processes", str(processes),
        "-m", "tuneloop.cli", *cli_args, "--set", f"train.num_processes={processes}",
    ]  # fmt: skip


def _processes(cfg: TrainConfig) -> int:
    """The process count, after checking that this machine can run `cfg.distributed` with it."""
    import torch

    gpus = torch.cuda.device_count()
    if cfg.distributed in ("deepspeed-zero2", "deepspeed-zero3", "fsdp") and gpus == 0:
        raise TuneloopError(f"train.distributed={cfg.distributed} needs CUDA GPUs; use ddp on this machine")
    if cfg.distributed.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise TuneloopError(f"train.distributed={cfg.distributed} needs deepspeed: pip install deepspeed")
    if gpus and cfg.num_processes and cfg.num_processes > gpus:
        raise TuneloopError(f"train.num_processes={cfg.num_processes}, but this machine has {gpus} GPU(s)")
    return cfg.num_processes or gpus or CPU_PROCESSES


def _release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
