"""Promotion and rollback through the real CLI on the tiny model: the `production` alias moves, the bare
model name follows it, the history keeps who, when, from, to, the gate verdict and --force; a version no
gate vouched for needs --force, a version that does not load is never promoted."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tuneloop.artifacts import Adapter, EvalReport, ModelVersion, save_meta
from tuneloop.config import load_config
from tuneloop.registry import adapter_paths, history, production_version, promotion_refusal, version_dir


@pytest.fixture
def project(prepared_project, tiny_model_dir, tmp_path, monkeypatch):
    """A prepared run whose `register(adapter_dir, passed, *args)` makes `adapter_dir` the run's trained and
    evaluated adapter (gate passed or failed) and registers it with `tuneloop registry register *args`;
    returns (cli, register, config). The OS user is alice."""
    monkeypatch.setenv("LOGNAME", "alice")  # the first variable getpass.getuser() reads
    cli = prepared_project(f"""
name: triage
base_model: {tiny_model_dir}
data:
  path: data.jsonl
""")
    run_dir = tmp_path / "runs" / "triage"

    def register(adapter_dir: Path, passed: bool = True, *args: str) -> None:
        save_meta(Adapter(dir=adapter_dir, base_model=str(tiny_model_dir), dataset_hash="h", method="lora",
                          params={}, history=[], train_loss=0.0, val_loss=None, train_tokens=0, train_seconds=0.0),
                  run_dir / "train")
        save_meta(EvalReport(dir=run_dir / "eval", rows=8, baseline={"rouge_l": 0.2}, candidate={"rouge_l": 0.1},
                             gate_metrics=["rouge_l"], gate_passed=passed,
                             gate_failures=[] if passed else ["rouge_l: 10.0 % vs baseline 20.0 %"],
                             candidate_source=str(adapter_dir.resolve())),
                  run_dir / "eval")
        result = cli("registry", "register", "config.yaml", *args)
        assert result.exit_code == 0, result.output

    return cli, register, load_config(tmp_path / "config.yaml")


def test_promote_and_rollback_move_the_alias_the_bare_name_and_the_history(project, tiny_adapter_dir, tiny_model_dir):
    cli, register, cfg = project
    register(tiny_adapter_dir)
    register(tiny_adapter_dir)
    started = datetime.now(timezone.utc).replace(microsecond=0)

    first = cli("registry", "promote", "config.yaml", "1")
    second = cli("registry", "promote", "config.yaml", "2", "--by", "bob")

    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "production none → v1 (promote by alice, gate passed)" in first.output
    assert "production v1 → v2 (promote by bob, gate passed)" in second.output
    assert production_version(cfg.registry, "triage").version == 2
    paths = adapter_paths(cfg.registry, str(tiny_model_dir))
    assert paths["triage"] == paths["triage-v2"] == version_dir(cfg.registry, "triage", 2)
    again = cli("registry", "promote", "config.yaml", "2")
    assert again.exit_code == 1 and "triage version 2 is already in production" in again.output

    back = cli("registry", "rollback", "config.yaml")

    assert back.exit_code == 0, back.output
    assert "production v2 → v1 (rollback by alice, gate passed)" in back.output
    assert production_version(cfg.registry, "triage").version == 1
    paths = adapter_paths(cfg.registry, str(tiny_model_dir))
    assert paths["triage"] == version_dir(cfg.registry, "triage", 1)  # the alias wins over the newest version
    entries = history(cfg.registry, "triage")
    assert [(e.action, e.who, e.from_version, e.to_version, e.verdict, e.forced) for e in entries] == [
        ("promote", "alice", None, 1, "passed", False),
        ("promote", "bob", 1, 2, "passed", False),
        ("rollback", "alice", 2, 1, "passed", False),
    ]
    for entry in entries:
        when = datetime.fromisoformat(entry.when)
        assert when.utcoffset() == timedelta(0) and started <= when <= datetime.now(timezone.utc)
    table = cli("registry", "history", "config.yaml")
    assert table.exit_code == 0, table.output
    assert table.output.count("promote") == 2 and "rollback" in table.output and "bob" in table.output
    assert "- → v1" in table.output and "v1 → v2" in table.output and "v2 → v1" in table.output

    # The only promotion still in effect is the first one, which took the alias from no version.
    nothing = cli("registry", "rollback", "config.yaml")
    assert nothing.exit_code == 1
    assert "nothing to roll back to: version 1 was the first version of triage in production" in nothing.output
    assert production_version(cfg.registry, "triage").version == 1 and len(history(cfg.registry, "triage")) == 3


def test_a_version_no_gate_vouched_for_is_promoted_only_with_force(project, tiny_adapter_dir):
    from mlflow import MlflowClient

    cli, register, cfg = project
    register(tiny_adapter_dir, False, "--set", "eval.enforce_gate=false")  # failed, but not enforced
    client = MlflowClient(tracking_uri=f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}")
    tags = client.get_model_version("triage", "1").tags
    assert (tags["gate.verdict"], tags["gate.passed"], tags["gate.enforced"]) == ("not_enforced", "false", "false")
    assert tags["gate.failures"] == "rouge_l: 10.0 % vs baseline 20.0 %"

    refused = cli("registry", "promote", "config.yaml", "1")

    assert refused.exit_code == 1
    assert "registered with eval.enforce_gate: false" in refused.output
    assert "--force promotes it anyway" in refused.output
    assert production_version(cfg.registry, "triage") is None and history(cfg.registry, "triage") == []

    forced = cli("registry", "promote", "config.yaml", "1", "--force")

    assert forced.exit_code == 0, forced.output
    assert "none → v1 (promote by alice, gate not_enforced, forced)" in forced.output
    assert production_version(cfg.registry, "triage").version == 1
    [entry] = history(cfg.registry, "triage")
    assert (entry.verdict, entry.forced) == ("not_enforced", True)
    table = cli("registry", "history", "config.yaml")
    assert "not_enforced" in table.output and "yes" in table.output


def test_a_version_that_does_not_load_is_not_promoted(project, tiny_adapter_dir, tmp_path):
    cli, register, cfg = project
    nothing = cli("registry", "rollback", "config.yaml")
    assert nothing.exit_code == 1 and "nothing to roll back to" in nothing.output  # nothing registered yet
    register(tiny_adapter_dir)
    assert cli("registry", "promote", "config.yaml", "1").exit_code == 0
    broken = tmp_path / "broken-adapter"
    shutil.copytree(tiny_adapter_dir, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    register(broken)

    refused = cli("registry", "promote", "config.yaml", "2")

    assert refused.exit_code == 1
    assert "triage version 2 does not load, so it was not promoted" in refused.output
    assert production_version(cfg.registry, "triage").version == 1 and len(history(cfg.registry, "triage")) == 1
    unknown = cli("registry", "promote", "config.yaml", "7")
    assert unknown.exit_code == 1 and "model 'triage' has no version 7" in unknown.output


def test_a_failed_or_unrecorded_gate_needs_force_and_says_why():
    failed = ModelVersion(name="m", version=3, run_id="r", source="s", base_model="b", dataset_hash="h", metrics={},
                          gate_verdict="failed", gate_failures="schema_valid: 40.0 % vs baseline 60.0 %")
    assert promotion_refusal(failed, None, force=False) == (
        "m version 3 is not promoted: it failed the gate (schema_valid: 40.0 % vs baseline 60.0 %); "
        "--force promotes it anyway"
    )
    assert promotion_refusal(failed, None, force=True) is None
    older = ModelVersion(name="m", version=1, run_id="r", source="s", base_model="b", dataset_hash="h", metrics={})
    assert "registered before tuneloop kept gate verdicts" in promotion_refusal(older, failed, force=False)
    assert older.gate_verdict == "unknown"  # the default of versions registered before verdicts were kept
