"""Distributed training: `tuneloop train` with `train.distributed: ddp` runs itself again in two CPU
processes (gloo) and ends where one process with the same global batch ends; the shipped accelerate
configs load; machines that cannot run a choice are told so in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import TrainConfig, load_config
from tuneloop.data import prepare
from tuneloop.errors import TuneloopError
from tuneloop.train import train
from tuneloop.train.launch import launch_command

REPO = Path(__file__).resolve().parents[1]

# One global batch of 4 rows per step: one process with 4, or 2 processes with 2 each. Accelerate deals the
# batches of the seeded shuffle round-robin (process 0 batch 0, process 1 batch 1, ...), so each step of
# either run sees the same 4 rows. No dropout, fp32; one epoch of 24 rows is 6 steps in both runs.
RECIPE = (
    "  epochs: 1\n  learning_rate: 0.002\n  warmup_ratio: 0.0\n  lora_dropout: 0.0\n  precision: fp32\n"
    "  eval_steps: 1000\n  seed: 7\n"
)


def test_ddp_on_two_cpu_processes_matches_one_process(tiny_model_dir, tmp_path):
    lines = (REPO / "examples" / "ticket-triage" / "data.jsonl").read_text().splitlines()[:30]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"name: dist\nbase_model: {tiny_model_dir}\ndata:\n  path: data.jsonl\n  system_prompt: Triage.\n"
        f"train:\n{RECIPE}"
    )
    cfg = load_config(config)
    data = prepare(cfg.data, tmp_path / cfg.run_dir)  # the CLI below runs in tmp_path and finds it there
    assert (data.counts["train"], data.counts["val"]) == (24, 3)
    assert cfg.train.batch_size == 4
    single = train(cfg.train, data, BaseModelRef("tiny", tiny_model_dir), tmp_path / "single")

    overrides = ["train.distributed=ddp", "train.num_processes=2", "train.batch_size=2"]
    process = subprocess.run(
        [sys.executable, "-m", "tuneloop", "train", str(config), *[a for o in overrides for a in ("--set", o)]],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.count("adapter: ") == 1  # reported once, by the launching command
    meta = json.loads((tmp_path / "runs/dist/train/meta.json").read_text())
    assert meta["params"]["distributed"] == "ddp" and meta["params"]["num_processes"] == 2

    # The same steps over the same rows: the token counts of every step agree exactly.
    steps = lambda history: [h for h in history if "loss" in h]  # noqa: E731
    assert len(steps(single.history)) == len(steps(meta["history"])) == 6
    assert [h["num_tokens"] for h in steps(meta["history"])] == [h["num_tokens"] for h in steps(single.history)]
    # The same loss: each process divides its sum by the tokens of the whole global batch, times the
    # process count, and DDP averages the gradients; only the order of float sums differs.
    for ddp_step, single_step in zip(steps(meta["history"]), steps(single.history), strict=True):
        assert ddp_step["loss"] == pytest.approx(single_step["loss"], rel=1e-4)
        assert ddp_step["grad_norm"] == pytest.approx(single_step["grad_norm"], rel=1e-3)
    # The validation loss is the Trainer's mean of per-batch means, and the batches differ: the 3 rows at once
    # vs 2 per process, the last round padded with a repeated row so both processes have a batch. Equal
    # weights give equal per-row losses; only that averaging differs (about 1 % here, deterministically).
    assert meta["val_loss"] == pytest.approx(single.val_loss, rel=0.02)

    ddp_weights = load_file(tmp_path / "runs/dist/train/adapter/adapter_model.safetensors")
    single_weights = load_file(single.dir / "adapter_model.safetensors")
    assert ddp_weights.keys() == single_weights.keys()
    for name, weight in single_weights.items():
        if "lora_B" in name:
            assert weight.abs().max() > 1e-3  # trained away from its zero start, so the comparison means something
        # Adam divides by the root of tiny second moments, so a single element can amplify float-order noise
        # (packed rows are padded to different lengths in one and two processes); the whole tensor must agree
        # to 0.1 %.
        assert (ddp_weights[name] - weight).norm() <= 1e-3 * weight.norm(), name


@pytest.mark.parametrize("choice", ["ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp"])
def test_each_choice_has_a_shipped_accelerate_config(choice, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    pretend_installed(monkeypatch, "deepspeed", True)
    command = launch_command(TrainConfig(distributed=choice, num_processes=4), ["train", "config.yaml"])
    shipped = Path(str(files("tuneloop.train.launch") / f"{choice}.yaml"))
    assert command[command.index("--config_file") + 1] == str(shipped)
    assert command[command.index("--num_processes") + 1] == "4"
    relaunched = ["-m", "tuneloop.cli", "train", "config.yaml", "--set", "train.num_processes=4"]
    assert command[command.index("-m", 3) :] == relaunched
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(choice, "DEEPSPEED")
    assert ClusterConfig.from_yaml_file(shipped).distributed_type.value == expected


def test_process_count_defaults_to_every_gpu_or_two_cpu_processes(monkeypatch):
    at = lambda command: command[command.index("--num_processes") + 1]  # noqa: E731
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert at(launch_command(TrainConfig(distributed="ddp"), ["train", "c.yaml"])) == "3"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert at(launch_command(TrainConfig(distributed="ddp"), ["train", "c.yaml"])) == "2"


@pytest.mark.parametrize(
    ("choice", "gpus", "deepspeed", "message"),
    [
        ("fsdp", 0, True, "train.distributed=fsdp needs CUDA GPUs"),
        ("deepspeed-zero3", 0, True, "train.distributed=deepspeed-zero3 needs CUDA GPUs"),
        ("deepspeed-zero2", 2, False, "needs deepspeed: pip install deepspeed"),
    ],
)
def test_a_choice_this_machine_cannot_run_is_a_clear_error(choice, gpus, deepspeed, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    pretend_installed(monkeypatch, "deepspeed", deepspeed)
    with pytest.raises(TuneloopError, match=message):
        launch_command(TrainConfig(distributed=choice), ["train", "c.yaml"])


def pretend_installed(monkeypatch, package: str, installed: bool) -> None:
    import importlib.util

    real = importlib.util.find_spec
    fake = lambda name, *args: (object() if installed else None) if name == package else real(name, *args)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(TuneloopError, match="train.num_processes=4, but this machine has 2 GPU"):
        launch_command(TrainConfig(distributed="ddp", num_processes=4), ["train", "c.yaml"])
