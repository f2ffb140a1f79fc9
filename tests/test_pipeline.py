"""The loop called as a function on the tiny model: the result carries the dataset version with its lineage,
the registered version carries the lineage tags, and a refused fine-tune is returned, not registered."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from tuneloop import pipeline
from tuneloop.artifacts import EvalReport
from tuneloop.config import load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ticket-triage"


@pytest.fixture
def project(tiny_model_dir, tmp_path, monkeypatch):
    """tmp_path as the working directory (so the registry is ./mlruns there), with 40 ticket-triage rows and
    a short recipe; returns `config(*overrides)`, the loaded RunConfig."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "data.jsonl").write_text("\n".join((EXAMPLE / "data.jsonl").read_text().splitlines()[:40]) + "\n")
    (tmp_path / "config.yaml").write_text(f"""
name: triage-pipeline
base_model: {tiny_model_dir}
data:
  path: data.jsonl
  answer_schema: {EXAMPLE / 'schema.json'}
  system_prompt: Reply with a JSON triage object.
train:
  max_steps: 2
  batch_size: 8
eval:
  max_new_tokens: 6
  bootstrap_resamples: 200
""")
    return lambda *overrides: load_config(tmp_path / "config.yaml", list(overrides))


def test_run_returns_the_dataset_version_and_registers_it_as_lineage(project, tmp_path):
    from mlflow import MlflowClient

    cfg = project("eval.enforce_gate=false")  # random tiny weights cannot beat the baseline

    result = pipeline.run(cfg)

    assert result.refusal is None and result.version is not None and result.version.version == 1
    version = result.dataset_version
    data_file = tmp_path / "data.jsonl"
    assert version.hash == result.dataset.hash == result.adapter.dataset_hash
    assert version.sources == {str(data_file): hashlib.sha256(data_file.read_bytes()).hexdigest()}
    assert version.counts["read"] == 40
    assert version.counts["train"] + version.counts["val"] + version.counts["test"] <= 40
    assert version.split_hashes == result.dataset.split_hashes and version.parent is None
    recorded = json.loads((cfg.run_dir / "data" / "dataset_version.json").read_text())
    assert recorded == dataclasses.asdict(version)
    assert result.report.candidate is not None

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    tags = client.get_model_version("triage-pipeline", "1").tags
    assert tags["lineage.dataset"] == version.hash
    assert json.loads(tags["lineage.sources"]) == version.sources
    assert "lineage.parent" not in tags


def test_run_returns_the_gate_refusal_and_registers_nothing(project):
    from tuneloop.registry import list_versions

    cfg = project()  # the gate is enforced: 0 % schema compliance before and after training

    result = pipeline.run(cfg)

    assert result.version is None
    assert result.refusal.startswith("not registered: the fine-tune did not beat the baseline (schema_valid")
    assert result.report.gate_passed is False and result.adapter.dir.is_dir()
    assert list_versions(cfg.registry) == []


def test_the_gate_refuses_only_a_failed_gate_where_it_is_enforced():
    report = EvalReport(dir=Path("."), rows=1, baseline={}, candidate={}, gate_passed=False, gate_failures=["a", "b"])
    assert pipeline.gate_refusal(report, enforce=True) == "not registered: the fine-tune did not beat the baseline (a; b)"
    assert pipeline.gate_refusal(report, enforce=False) is None
    for passed in (True, None):  # passed, or no candidate scored
        assert pipeline.gate_refusal(dataclasses.replace(report, gate_passed=passed), enforce=True) is None


def test_a_dataset_version_of_other_data_is_not_taken_as_this_ones(project):
    cfg = project()
    data, version = pipeline.prepare_data(cfg)
    assert pipeline.dataset_version(data) == version
    assert pipeline.dataset_version(dataclasses.replace(data, hash="other")) is None
    (data.dir / "dataset_version.json").unlink()
    assert pipeline.dataset_version(data) is None
