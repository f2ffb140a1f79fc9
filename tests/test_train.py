"""Training robustness on the tiny model: resume after SIGKILL, NaN stop, pre-flight errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneloop.artifacts import BaseModelRef, Dataset
from tuneloop.config import TrainConfig
from tuneloop.errors import TuneloopError
from tuneloop.train import train

REPO = Path(__file__).resolve().parents[1]


def make_project(tmp_path: Path, model_dir: Path, train_section: str) -> Path:
    lines = (REPO / "examples" / "ticket-triage" / "data.jsonl").read_text().splitlines()[:48]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"name: resume\nbase_model: {model_dir}\ndata:\n  path: data.jsonl\n  system_prompt: Triage.\n"
        f"train:\n{train_section}"
    )
    return config


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tuneloop", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen, project: Path) -> dict:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads((project / "runs/resume/train/meta.json").read_text())


SLOW_RUN = "  max_steps: 24\n  batch_size: 8\n  save_steps: 4\n  eval_steps: 1000\n  learning_rate: 0.001\n"


def prepare_in(project: Path, config: Path) -> None:
    """`tuneloop data` in this process (the training runs below are the subprocesses that matter)."""
    from tuneloop.config import load_config
    from tuneloop.pipeline import prepare_data

    cfg = load_config(config)
    prepare_data(cfg.model_copy(update={"output_dir": project / cfg.run_dir}))


def test_resume_after_sigkill_ends_at_the_same_loss(tiny_model_dir, tmp_path):
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    for d in (whole_dir, killed_dir):
        d.mkdir()
        prepare_in(d, make_project(d, tiny_model_dir, SLOW_RUN))
    uninterrupted = finished(cli("train", str(whole_dir / "config.yaml"), cwd=whole_dir), whole_dir)

    victim = cli("train", str(killed_dir / "config.yaml"), cwd=killed_dir)
    checkpoint = killed_dir / "runs/resume/train/checkpoints/checkpoint-8"
    deadline = time.monotonic() + 240
    while not (checkpoint / "trainer_state.json").exists():
        assert victim.poll() is None and time.monotonic() < deadline, victim.stderr.read()[-3000:]
        time.sleep(0.02)
    time.sleep(0.3)  # let the checkpoint's last files land; the run is still far from its 24 steps
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_dir / "runs/resume/train/meta.json").exists()  # it really died mid-run

    resumed = finished(cli("train", str(killed_dir / "config.yaml"), "--resume", cwd=killed_dir), killed_dir)
    assert resumed["history"][-1]["step"] == uninterrupted["history"][-1]["step"]
    assert resumed["val_loss"] == pytest.approx(uninterrupted["val_loss"], rel=0.01)
    last = lambda meta: [h["loss"] for h in meta["history"] if "loss" in h][-1]  # noqa: E731
    assert last(resumed) == pytest.approx(last(uninterrupted), rel=0.01)


def test_a_saved_checkpoint_is_announced_only_once_it_can_be_resumed_from(tiny_model_dir, tmp_path):
    # The jobs API lists a checkpoint when it is announced; a worker killed right after must find it on disk.
    from tuneloop.config import load_config
    from tuneloop.pipeline import train_adapter
    from tuneloop.train import SAVED, newest_checkpoint

    config = make_project(tmp_path, tiny_model_dir, "  max_steps: 4\n  batch_size: 8\n  save_steps: 2\n  eval_steps: 2\n")
    prepare_in(tmp_path, config)
    cfg = load_config(config)
    cfg = cfg.model_copy(update={"output_dir": tmp_path / cfg.run_dir})
    checkpoints = cfg.run_dir / "train" / "checkpoints"
    seen: list[tuple[int, str, str | None]] = []

    def on_log(step: int, total: int, logs: dict) -> None:
        newest = newest_checkpoint(checkpoints) if checkpoints.is_dir() else None
        kind = "saved" if logs.get(SAVED) else "validated" if "eval_loss" in logs else "other"
        seen.append((step, kind, newest.name if newest else None))

    train_adapter(cfg, on_log=on_log)
    saved = [(step, newest) for step, kind, newest in seen if kind == "saved"]
    assert sorted({step for step, _ in saved}) == [2, 4]
    assert all(newest == f"checkpoint-{step}" for step, newest in saved), seen
    # The trainer validates a step before it saves it: at the validation the step's checkpoint is not there yet.
    assert [(step, newest) for step, kind, newest in seen if kind == "validated"] == [(2, None), (4, "checkpoint-2")]


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path):
    config = make_project(tmp_path, tiny_model_dir, "  max_steps: 2\n")
    prepare_in(tmp_path, config)
    process = cli("train", str(config), "--resume", cwd=tmp_path)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "no checkpoint to resume from" in stderr and "Traceback" not in stderr


def test_non_finite_loss_stops_with_a_clear_message(tiny_model_dir, tmp_path):
    config = make_project(tmp_path, tiny_model_dir, "  max_steps: 30\n  batch_size: 8\n  save_steps: 2\n  learning_rate: 1.0e+30\n")
    prepare_in(tmp_path, config)
    process = cli("train", str(config), cwd=tmp_path)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-2000:]
    assert "training loss became" in stderr and "Lower train.learning_rate" in stderr
    assert not (tmp_path / "runs/resume/train/adapter").exists()


def dataset_stub(tmp_path: Path) -> Dataset:
    return Dataset(dir=tmp_path, train=tmp_path, val=tmp_path, test=tmp_path, hash="h", split_hashes={}, counts={})


def test_qlora_on_cpu_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(TuneloopError, match="qlora needs a CUDA GPU"):
        train(TrainConfig(method="qlora"), dataset_stub(tmp_path), BaseModelRef("tiny", tiny_model_dir), tmp_path)


def test_unwritable_output_is_reported_before_training(tiny_model_dir, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(TuneloopError, match="cannot write the training output"):
        train(TrainConfig(), dataset_stub(tmp_path), BaseModelRef("tiny", tiny_model_dir), blocker)


def test_full_fine_tuning_writes_a_model_that_evaluation_and_serving_load(tiny_model_dir, tiny_adapter_dir, tmp_path):
    config = make_project(tmp_path, tiny_model_dir, "  method: full\n  max_steps: 3\n  learning_rate: 1.0e-3\n")
    for stage in ("data", "train"):
        process = cli(stage, str(config), cwd=tmp_path)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    meta = json.loads((tmp_path / "runs/resume/train/meta.json").read_text())
    model_dir = Path(meta["dir"]) if Path(meta["dir"]).is_absolute() else tmp_path / meta["dir"]
    assert meta["method"] == "full" and model_dir.name == "model"
    assert (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").exists()
    assert "tuneloop_varlen" not in (model_dir / "config.json").read_text()  # loads anywhere with plain SDPA

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) > 10  # every layer trained, not an adapter
    assert load_file(next(model_dir.glob("*.safetensors")))  # weights written as safetensors

    from tuneloop.evaluate.generate import generate_answers

    answers = generate_answers(BaseModelRef("tiny", tiny_model_dir), model_dir, [[{"role": "user", "content": "hi"}]], 4, 1, "full")
    assert answers[0].completion_tokens > 0

    import asyncio

    from tuneloop.config import ServeConfig
    from tuneloop.serve import build_engine
    from tuneloop.serve.engine import Completion, EngineRequest, Sampling

    engine = build_engine(
        ServeConfig(dtype="float32"), BaseModelRef("tiny", tiny_model_dir), {"triage-v1": model_dir, "triage-lora": tiny_adapter_dir}
    )
    hi = [{"role": "user", "content": "hi"}]

    async def answer_all() -> dict[str, str]:
        texts = {}
        for model in engine.models():
            async for event in engine.generate(EngineRequest(model.name, Sampling(max_tokens=4), messages=hi)):
                if isinstance(event, Completion):
                    texts[model.name] = event.text
        await engine.close()
        return texts

    served = asyncio.run(answer_all())
    assert served["triage-v1"] == answers[0].text  # the full model answers as evaluation saw it
    assert served["triage-lora"] != served["tiny"]  # adapters still switch on the shared base
