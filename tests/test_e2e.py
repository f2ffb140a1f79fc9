"""End to end through the real CLI on the tiny model: run, registry, serve with the openai client,
and the first errors a new user meets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "ticket-triage"


def tuneloop(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "tuneloop", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def write_config(project: Path, model_dir: Path, rows: int = 48) -> Path:
    lines = (EXAMPLE / "data.jsonl").read_text().splitlines()[:rows]
    (project / "data.jsonl").write_text("\n".join(lines) + "\n")
    body = f"""
name: triage-e2e
base_model: {model_dir}
data:
  path: data.jsonl
  answer_schema: {EXAMPLE / 'schema.json'}
  system_prompt: Reply with a JSON triage object.
train:
  epochs: 1
  batch_size: 8
  learning_rate: 0.001
eval:
  max_new_tokens: 12
"""
    path = project / "config.yaml"
    path.write_text(body)
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    config = write_config(project, tiny_model_dir)
    # Random tiny weights score 0 % before and after training, so the gate would refuse the version.
    result = tuneloop("run", str(config), "--set", "eval.enforce_gate=false", cwd=project)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return project, config, result


def test_run_writes_every_stage_and_prints_the_table(finished_run):
    project, _, result = finished_run
    run_dir = project / "runs" / "triage-e2e"
    for name in ("report.md", "loss.png", "metrics.png", "data/meta.json", "train/adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    for image in ("loss.png", "metrics.png"):
        assert (run_dir / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("JSON validity", "schema compliance", "accuracy: category", "ROUGE-L", "mean latency"):
        assert label in result.stdout
    assert "registered triage-e2e version 1" in result.stdout

    evaluation = json.loads((run_dir / "eval" / "meta.json").read_text())
    assert evaluation["rows"] == 5
    assert set(evaluation["baseline"]) == set(evaluation["candidate"])
    assert 0.0 <= evaluation["candidate"]["schema_valid"] <= 1.0


def test_test_rows_are_never_trained_on(finished_run):
    project, _, _ = finished_run
    data = project / "runs" / "triage-e2e" / "data"
    train = {json.dumps(json.loads(l)["messages"]) for l in (data / "train.jsonl").read_text().splitlines()}
    test = {json.dumps(json.loads(l)["messages"]) for l in (data / "test.jsonl").read_text().splitlines()}
    assert test and not train & test


def test_adapter_weights_moved_away_from_init(finished_run):
    from safetensors.torch import load_file

    project, _, _ = finished_run
    weights = load_file(project / "runs" / "triage-e2e" / "train" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # PEFT starts every B at zero


def test_registry_records_lineage_and_per_step_metrics(finished_run):
    from mlflow import MlflowClient

    project, _, _ = finished_run
    listing = tuneloop("registry", "list", cwd=project)
    assert listing.returncode == 0, listing.stderr
    assert "triage-e2e" in listing.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    version = client.get_model_version("triage-e2e", "1")
    run = client.get_run(version.run_id)
    meta = json.loads((project / "runs" / "triage-e2e" / "train" / "meta.json").read_text())
    assert version.run_id == meta["mlflow_run_id"]  # the run logged while training, not a second one
    assert run.data.params["dataset_hash"] == meta["dataset_hash"] == version.tags["dataset_hash"]
    assert run.data.params["train.lora_r"] == "16"
    steps = [h for h in meta["history"] if "loss" in h]
    assert len(client.get_metric_history(version.run_id, "loss")) == len(steps) == 5
    assert "candidate.schema_valid" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(version.run_id)}
    assert {"adapter", "config.yaml"} <= artifacts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_round_trip_with_the_openai_client(finished_run):
    from openai import OpenAI

    project, config, _ = finished_run
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "tuneloop", "serve", str(config), "--port", str(port)],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        names = {m.id for m in client.models.list().data}
        assert {"triage-e2e", "triage-e2e-v1"} <= names

        messages = [{"role": "user", "content": "My card reader will not pair."}]
        reply = client.chat.completions.create(model="triage-e2e", messages=messages, max_tokens=6)
        assert reply.object == "chat.completion"
        assert reply.choices[0].message.role == "assistant"
        assert reply.usage.completion_tokens <= 6

        chunks = list(client.chat.completions.create(model="triage-e2e", messages=messages, max_tokens=6, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == reply.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_config", "config.yaml: config file not found"),
        ("bad_key", "unknown key 'train.epoch'; did you mean 'train.epochs'?"),
        ("missing_data", "data file not found"),
        ("unknown_model", "base model 'no-such-model': no such directory"),
        ("hub_unreachable", "base model 'no-such-org/no-such-model': could not fetch it"),
        ("malformed_jsonl", "data.jsonl:2: invalid JSON"),
    ],
)
def test_first_errors_are_one_clear_line(case, expected, tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir)
    text = config.read_text()
    if case == "missing_config":
        config.unlink()
    elif case == "bad_key":
        config.write_text(text.replace("epochs:", "epoch:"))
    elif case == "missing_data":
        (tmp_path / "data.jsonl").unlink()
    elif case in ("unknown_model", "hub_unreachable"):
        name = "no-such-model" if case == "unknown_model" else "no-such-org/no-such-model"
        config.write_text(text.replace(f"base_model: {tiny_model_dir}", f"base_model: {name}"))
    elif case == "malformed_jsonl":
        good = (tmp_path / "data.jsonl").read_text().splitlines()[0]
        (tmp_path / "data.jsonl").write_text(good + "\n{oops\n")
    result = tuneloop("run", str(config), cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, result.stderr
    assert expected in error_lines[0]


def test_registry_turns_mlflow_telemetry_off(monkeypatch):
    import importlib

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    import tuneloop.registry.store as store

    importlib.reload(store)
    from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY

    assert MLFLOW_DISABLE_TELEMETRY.get() is True  # read by MLflow itself, not only in pytest/CI


def test_each_stage_runs_alone(tiny_model_dir, tmp_path):
    config = str(write_config(tmp_path, tiny_model_dir))
    for step in (["data", config], ["eval", config, "--baseline-only"], ["train", config], ["eval", config]):
        result = tuneloop(*step, cwd=tmp_path)
        assert result.returncode == 0, f"{step}: {result.stderr[-2000:]}"
    assert "schema compliance" in result.stdout
    refused = tuneloop("registry", "register", config, cwd=tmp_path)  # random weights: 0 % vs 0 %
    assert refused.returncode == 1
    assert "not registered: the fine-tune did not beat the baseline (schema_valid" in refused.stderr
    registered = tuneloop("registry", "register", config, "--set", "eval.enforce_gate=false", cwd=tmp_path)
    assert registered.returncode == 0, registered.stderr[-2000:]
    assert "registered triage-e2e version 1" in registered.stdout


def test_train_before_data_says_what_to_run(tiny_model_dir, tmp_path):
    result = tuneloop("train", str(write_config(tmp_path, tiny_model_dir)), cwd=tmp_path)
    assert result.returncode == 1
    assert "run `tuneloop data CONFIG` first" in result.stderr


def _as_format(row: dict, fmt: str) -> dict:
    user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
    if fmt == "alpaca":
        return {"instruction": "Triage this support message.", "input": user, "output": answer}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]}
    return {"prompt": user, "chosen": answer, "rejected": '{"category": "other"}'}  # preference pair


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "preference"])
def test_other_formats_go_end_to_end(fmt, tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, rows=40)
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(_as_format(r, fmt)) + "\n" for r in rows))
    result = tuneloop("run", str(config), "--set", "eval.enforce_gate=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read 40 rows, rejected 0" in result.stdout
    train_row = json.loads((tmp_path / "runs/triage-e2e/data/train.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in train_row["messages"]] == ["system", "user", "assistant"]
    assert "registered triage-e2e version 1" in result.stdout


def test_run_refuses_a_version_that_does_not_beat_the_baseline(tiny_model_dir, tmp_path):
    config = str(write_config(tmp_path, tiny_model_dir, rows=40))

    result = tuneloop("run", config, cwd=tmp_path)  # random tiny weights: 0 % schema compliance either way

    assert result.returncode == 3, result.stderr[-3000:]
    assert "gate FAILED, not promoted" in result.stdout and "schema_valid: +0.0 pts vs the baseline" in result.stdout
    assert "registered" not in result.stdout
    listed = tuneloop("registry", "list", config, cwd=tmp_path)
    assert listed.returncode == 0 and "no registered versions yet" in listed.stdout
