"""Training on the tiny model, logged to MLflow as it trains, with a score for every checkpoint: the run
holds every step and validation, `registry register` adds the version to that run, and the adapter kept
is the best-scoring checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tuneloop.artifacts import BaseModelRef, EvalReport
from tuneloop.config import DataConfig, EvalConfig, RegistryConfig, TrainConfig
from tuneloop.data import prepare
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.checkpoint import checkpoint_scorer
from tuneloop.registry import register, training_tracking
from tuneloop.train import CheckpointScorer, train

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ticket-triage"


@pytest.fixture
def triage(tmp_path):
    lines = (EXAMPLE / "data.jsonl").read_text().splitlines()[:48]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(path=tmp_path / "data.jsonl", answer_schema=EXAMPLE / "schema.json", system_prompt="Triage.")
    return prepare(cfg, tmp_path)


def registry_at(tmp_path: Path) -> RegistryConfig:
    return RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")


def test_run_is_logged_while_training_and_registered_on_the_same_run(tiny_model_dir, triage, tmp_path):
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    # The real scorer (greedy answers to 4 validation rows, JSON validity) runs at every validation; the
    # scores it reports are scripted, so that the second of four validations is the best.
    real = checkpoint_scorer(EvalConfig(checkpoint_metric="json_valid", checkpoint_rows=4, max_new_tokens=6), triage)
    scripted, seen = iter([0.1, 0.7, 0.3, 0.2]), []

    def score(model, tokenizer) -> float:
        seen.append((model.training, real.score(model, tokenizer)))
        return next(scripted)

    registry = registry_at(tmp_path)
    cfg = TrainConfig(max_steps=8, batch_size=8, eval_steps=2, learning_rate=1e-3)
    tracking, scorer = training_tracking(registry, "triage"), CheckpointScorer("scripted", score)
    base = BaseModelRef("tiny", tiny_model_dir)
    adapter = train(cfg, triage, base, tmp_path, tracking=tracking, score_checkpoint=scorer)

    # Every validation scored the model in eval mode, with real answers graded.
    assert len(seen) == 4 and all(not training and 0.0 <= value <= 1.0 for training, value in seen)
    validations = [h for h in adapter.history if "eval_loss" in h]
    assert [(h["step"], h["eval_scripted"]) for h in validations] == [(2, 0.1), (4, 0.7), (6, 0.3), (8, 0.2)]
    assert adapter.checkpoint_metric == "eval_scripted" and adapter.best_step == 4
    meta = json.loads((tmp_path / "train" / "meta.json").read_text())
    assert meta["best_step"] == 4 and meta["mlflow_run_id"] == adapter.mlflow_run_id is not None

    # The adapter kept is the best checkpoint, not the last one.
    kept = load_file(adapter.dir / "adapter_model.safetensors")
    for step, same in ((4, True), (8, False)):
        checkpoint = load_file(tmp_path / "train" / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors")
        assert all(kept[k].equal(checkpoint[k]) for k in kept) is same, step

    # MLflow holds every step and every validation, logged during training, and the run ended well.
    client = MlflowClient(tracking_uri=registry.tracking_uri)
    run = client.get_run(adapter.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset_hash"] == triage.hash and run.data.params["train.eval_steps"] == "2"
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert [step for step, _ in history("loss")] == list(range(1, 9))
    assert [s for s, _ in history("learning_rate")] == [s for s, _ in history("grad_norm")] == list(range(1, 9))
    assert [step for step, _ in history("eval_loss")] == [2, 4, 6, 8]
    assert history("eval_scripted") == [(2, 0.1), (4, 0.7), (6, 0.3), (8, 0.2)]

    # Registering adds the evaluation and the version to that run; nothing is logged twice.
    report = EvalReport(dir=tmp_path, rows=4, baseline={"json_valid": 0.0}, candidate={"json_valid": 0.5})
    version = register(registry, "triage", adapter, report, triage, {"name": "triage"})
    assert version.run_id == adapter.mlflow_run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert len(history("loss")) == 8
    assert client.get_run(version.run_id).data.metrics["candidate.json_valid"] == 0.5
    assert "adapter" in {a.path for a in client.list_artifacts(version.run_id)}

    # An adapter trained before runs were logged during training still gets a run of its own, with its history.
    older = register(registry, "triage", dataclasses.replace(adapter, mlflow_run_id=None), report, triage, {})
    assert older.run_id != adapter.mlflow_run_id
    assert len(client.get_metric_history(older.run_id, "loss")) == 8


def test_a_failed_training_ends_its_run_as_failed(tiny_model_dir, triage, tmp_path):
    from mlflow import MlflowClient

    def broken(model, tokenizer) -> float:
        raise RuntimeError("scorer broke")

    registry = registry_at(tmp_path)
    tracking = training_tracking(registry, "triage")
    with pytest.raises(RuntimeError, match="scorer broke"):
        train(TrainConfig(max_steps=2, batch_size=8, eval_steps=1), triage, BaseModelRef("tiny", tiny_model_dir),
              tmp_path, tracking=tracking, score_checkpoint=CheckpointScorer("broken", broken))
    client = MlflowClient(tracking_uri=registry.tracking_uri)
    (run,) = client.search_runs([tracking.experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]


def test_dpo_scores_checkpoints_and_logs_its_run(tiny_model_dir, tmp_path):
    from mlflow import MlflowClient

    rows = [{"prompt": f"Name item {i}.", "chosen": f'{{"item": {i}}}', "rejected": "No."} for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = DataConfig(path=tmp_path / "pairs.jsonl", format="preference", near_duplicate_threshold=None)
    data = prepare(pairs, tmp_path)
    registry = registry_at(tmp_path)
    scorer = checkpoint_scorer(EvalConfig(checkpoint_metric="json_valid", checkpoint_rows=2, max_new_tokens=4), data)
    adapter = train(TrainConfig(method="dpo", max_steps=4, batch_size=4, eval_steps=2), data,
                    BaseModelRef("tiny", tiny_model_dir), tmp_path, tracking=training_tracking(registry, "pairs"),
                    score_checkpoint=scorer)

    assert [h["step"] for h in adapter.history if "eval_json_valid" in h] == [2, 4]
    assert adapter.best_step == 2  # random weights write no JSON: no later checkpoint scores higher
    client = MlflowClient(tracking_uri=registry.tracking_uri)
    assert [m.step for m in client.get_metric_history(adapter.mlflow_run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(adapter.mlflow_run_id, "eval_json_valid")] == [2, 4]

    # A resumed training logs a new run that holds the steps from before the interruption too.
    resumed = train(TrainConfig(method="dpo", max_steps=6, batch_size=4, eval_steps=2), data,
                    BaseModelRef("tiny", tiny_model_dir), tmp_path, resume=True,
                    tracking=training_tracking(registry, "pairs"), score_checkpoint=scorer)
    assert resumed.mlflow_run_id != adapter.mlflow_run_id
    assert [m.step for m in client.get_metric_history(resumed.mlflow_run_id, "loss")] == list(range(1, 7))
    assert [m.step for m in client.get_metric_history(resumed.mlflow_run_id, "eval_json_valid")] == [2, 4, 6]


def test_train_command_logs_and_scores_when_configured(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    lines = (EXAMPLE / "data.jsonl").read_text().splitlines()[:40]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "config.yaml").write_text(
        f"name: cli\nbase_model: {tiny_model_dir}\ndata:\n  path: data.jsonl\n"
        "train:\n  max_steps: 2\n  eval_steps: 1\n"
        "eval:\n  checkpoint_metric: json_valid\n  checkpoint_rows: 2\n  max_new_tokens: 4\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for command in ("data", "train"):
        done = subprocess.run([sys.executable, "-m", "tuneloop", command, "config.yaml"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((tmp_path / "runs" / "cli" / "train" / "meta.json").read_text())
    assert meta["checkpoint_metric"] == "eval_json_valid" and meta["best_step"] == 1
    assert [h["step"] for h in meta["history"] if "eval_json_valid" in h] == [1, 2]
    assert meta["mlflow_run_id"] and (tmp_path / "mlruns" / "mlflow.db").is_file()


def test_checkpoint_metric_settings_fail_early(tmp_path, triage):
    with pytest.raises(ValueError, match="checkpoint_metric"):
        EvalConfig(checkpoint_metric="judge")
    with pytest.raises(ValueError, match="needs a regex entry"):
        EvalConfig(checkpoint_metric="regex")
    regex = EvalConfig(checkpoint_metric="regex", metrics=[{"name": "regex", "pattern": "^{"}])
    assert checkpoint_scorer(regex, triage).name == "regex"
    no_val = dataclasses.replace(triage, counts={**triage.counts, "val": 0})
    with pytest.raises(TuneloopError, match="needs a validation split"):
        train(TrainConfig(), no_val, BaseModelRef("tiny", tmp_path), tmp_path,
              score_checkpoint=checkpoint_scorer(EvalConfig(checkpoint_metric="json_valid"), no_val))
    no_schema = dataclasses.replace(triage, answer_schema=None)
    with pytest.raises(TuneloopError, match="schema_valid needs data.answer_schema"):
        checkpoint_scorer(EvalConfig(checkpoint_metric="schema_valid"), no_schema)
