"""The loop closed on live traffic: serve -> requests -> feedback with corrections -> `tuneloop retrain` ->
promoted and answered under the bare name -> `tuneloop monitor` shows both versions -> rollback. The tiny
model cannot pass a real gate, so the retrained candidate's answers are replaced by known-better (the
references) or known-worse ones, as the opponent tests do."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from openai import OpenAI

from tests.conftest import TICKETS
from tuneloop.artifacts import Adapter, BaseModelRef, EvalReport, save_meta
from tuneloop.config import load_config
from tuneloop.data.pii import PiiScanner
from tuneloop.evaluate.generate import Generation
from tuneloop.pipeline import open_request_log
from tuneloop.registry import adapter_paths, list_versions, production_version
from tuneloop.serve import build_engine
from tuneloop.serve.app import create_app
from tuneloop.serve.contract import served_models
from tuneloop.serve.request_log import connect, read_requests

ROWS = [json.loads(line) for line in TICKETS.read_text().splitlines()]
LIVE = ROWS[40:56]  # tickets the run never saw: the live traffic, with their references as corrections


@pytest.fixture
def served(prepared_project, tiny_model_dir, tiny_adapter_dir, tmp_path, serve_app, monkeypatch):
    """Version 1 (the tiny adapter, gate passed) in production, served with a request log; returns
    (cli, config, OpenAI client, base URL)."""
    monkeypatch.setenv("LOGNAME", "alice")
    cli = prepared_project(f"""
name: triage
base_model: {tiny_model_dir}
data:
  path: data.jsonl
train:
  max_steps: 2
  batch_size: 2
eval:
  max_new_tokens: 4
  bootstrap_resamples: 200
  metrics: [{{name: exact_match, gate: true}}]
retrain:
  golden_share: 0.5
  golden_min_rows: 1
""")
    cfg = load_config(tmp_path / "config.yaml")
    run_dir = tmp_path / "runs" / "triage"
    save_meta(Adapter(dir=tiny_adapter_dir, base_model=str(tiny_model_dir), dataset_hash="h", method="lora",
                      params={}, history=[], train_loss=0.0, val_loss=None, train_tokens=0, train_seconds=0.0),
              run_dir / "train")
    save_meta(EvalReport(dir=run_dir / "eval", rows=4, baseline={"exact_match": 0.0}, candidate={"exact_match": 0.5},
                         gate_metrics=["exact_match"], gate_passed=True, candidate_source=str(tiny_adapter_dir)),
              run_dir / "eval")
    for args in (("registry", "register", "config.yaml"), ("registry", "promote", "config.yaml", "1")):
        assert cli(*args).exit_code == 0

    base = BaseModelRef(str(tiny_model_dir), tiny_model_dir)
    serve_cfg = cfg.serve.model_copy(update={"reload_interval": 0.5})
    registered = lambda: adapter_paths(cfg.registry, base.name)  # noqa: E731
    engine = build_engine(serve_cfg, base, registered())
    app = create_app(engine, serve_cfg, versions=lambda: served_models(base, registered())[1],
                     request_log=open_request_log(cfg))
    url = serve_app(app)
    return cli, cfg, OpenAI(base_url=url, api_key="unused", max_retries=0), url


def answers_like(monkeypatch, references: dict[str, str] | None) -> None:
    """The retrained candidate answers each prompt with its reference (known-better), or, with None, with
    "no" (known-worse); the baselines and the production version generate as usual."""
    from tuneloop.evaluate import harness

    real = harness._local

    def local(cfg, base, model_dir, label):
        if label != "candidate":
            return real(cfg, base, model_dir, label)
        return lambda prompts: [Generation("no" if references is None else references[p[-1]["content"]], 1.0, 1, 1)
                                for p in prompts]

    monkeypatch.setattr(harness, "_local", local)


def version_of(cfg, reply_id: str) -> str:
    open_request_log(cfg).flush()
    deadline = time.monotonic() + 10
    while True:
        rows = {r["id"]: r for r in read_requests(connect(cfg.request_log_url), since=0)}
        if reply_id in rows:
            return rows[reply_id]["version"]
        assert time.monotonic() < deadline, f"{reply_id} was not logged"
        time.sleep(0.1)


def ask(client: OpenAI, row: dict):
    return client.chat.completions.create(model="triage", messages=row["messages"][:-1], max_tokens=4)


def served_by(client: OpenAI, cfg, version: str) -> None:
    deadline = time.monotonic() + 10
    while version_of(cfg, ask(client, LIVE[0]).id) != version:
        assert time.monotonic() < deadline, f"the bare name did not move to {version} within 10 s"
        time.sleep(0.3)


def test_feedback_retrain_promote_monitor_rollback(served, monkeypatch, tmp_path):
    cli, cfg, client, url = served
    replies = [ask(client, row) for row in LIVE[:12]]
    assert {version_of(cfg, r.id) for r in replies} == {"triage-v1"}
    corrections = {r.id: row["messages"][-1]["content"] for r, row in zip(replies, LIVE)}
    for reply_id, correction in list(corrections.items())[:-1]:
        sent = httpx.post(f"{url}/feedback", json={"completion_id": reply_id, "rating": "bad",
                                                    "correction": correction}, timeout=30)
        assert sent.status_code == 200, sent.text
    last = replies[-1].id
    added = cli("feedback", "add", "config.yaml", last, "--rating", "bad", "--correction", corrections[last])
    assert added.exit_code == 0 and f"stored for {last}" in added.output

    # Known-better: the gate passes on the frozen test split and on the golden set; v2 is promoted.
    scrub = lambda text: PiiScanner().redact(text)[0]  # noqa: E731 - as the data stage and the log store them
    references = {scrub(row["messages"][-2]["content"]): scrub(row["messages"][-1]["content"]) for row in ROWS[:56]}
    answers_like(monkeypatch, references)
    retrained = cli("retrain", "config.yaml")
    assert retrained.exit_code == 0, retrained.output
    assert "version 2 promoted to production" in retrained.output
    assert production_version(cfg.registry, "triage").version == 2

    run_dir = tmp_path / "runs" / "triage"
    lineage = json.loads((run_dir / "retrain" / "001" / "data" / "dataset_version.json").read_text())
    original = json.loads((run_dir / "data" / "dataset_version.json").read_text())
    assert lineage["parent"] == original["hash"]
    assert lineage["feedback"] and lineage["golden"] and not set(lineage["feedback"]) & set(lineage["golden"])
    assert set(lineage["feedback"]) | set(lineage["golden"]) == set(corrections)
    assert lineage["split_hashes"]["test"] == original["split_hashes"]["test"]  # the test split is frozen
    assert (run_dir / "retrain" / "001" / "golden" / "eval" / "meta.json").is_file()  # scored on golden too
    v2 = next(v for v in list_versions(cfg.registry, "triage") if v.version == 2)
    tags = _version_tags(cfg, 2)
    assert tags["lineage.feedback"].split(",") == lineage["feedback"] and tags["lineage.parent"] == original["hash"]
    assert v2.gate_verdict == "passed"

    served_by(client, cfg, "triage-v2")  # promoted: answered under the bare name, no restart

    monitored = cli("monitor", "config.yaml", "--since", "1h")
    assert monitored.exit_code == 0, monitored.output
    assert "triage-v1" in monitored.output and "triage-v2" in monitored.output
    report = json.loads((run_dir / "monitor" / "meta.json").read_text())
    assert {"triage-v1", "triage-v2"} <= set(report["versions"])
    assert report["versions"]["triage-v1"]["volume"] >= 12
    assert "triage-v2" in (run_dir / "monitor" / "monitor_report.html").read_text()

    assert cli("registry", "rollback", "config.yaml").exit_code == 0
    served_by(client, cfg, "triage-v1")

    # Nothing new since: exit 5. New corrections and a known-worse candidate: refused, exit 3, v1 stays.
    nothing = cli("retrain", "config.yaml")
    assert nothing.exit_code == 5 and "nothing new to train on" in nothing.output
    more = [ask(client, row) for row in LIVE[12:16]]
    for reply, row in zip(more, LIVE[12:16]):
        httpx.post(f"{url}/feedback", json={"completion_id": reply.id, "rating": "bad",
                                            "correction": row["messages"][-1]["content"]}, timeout=30)
    # A completion trained on before is corrected again: its newest correction replaces the earlier row.
    again = lineage["feedback"][0]
    assert httpx.post(f"{url}/feedback", json={"completion_id": again, "rating": "bad", "correction": "{}"},
                      timeout=30).status_code == 200
    answers_like(monkeypatch, None)
    refused = cli("retrain", "config.yaml")
    assert refused.exit_code == 3 and "not registered or promoted" in refused.output
    pool = run_dir / "retrain" / "002" / "sources" / "pool"
    fed = [json.loads(line) for line in (pool / "feedback.jsonl").read_text().splitlines()]
    assert [(e["completion_id"], e["messages"][-1]["content"]) for e in fed if e["completion_id"] == again] == [
        (again, "{}")]
    assert corrections[again] not in (pool / "previous.jsonl").read_text()
    assert [v.version for v in list_versions(cfg.registry, "triage")] == [2, 1]
    assert production_version(cfg.registry, "triage").version == 1


def _version_tags(cfg, number: int) -> dict[str, str]:
    from mlflow import MlflowClient

    from tuneloop.registry.store import _client

    _client(cfg.registry)
    return MlflowClient().get_model_version("triage", str(number)).tags


@pytest.mark.parametrize("window", ["soon", "10x"])
def test_monitor_rejects_a_window_that_is_not_a_duration(prepared_project, tiny_model_dir, window):
    cli = prepared_project(f"name: t\nbase_model: {tiny_model_dir}\ndata:\n  path: data.jsonl\n")
    result = cli("monitor", "config.yaml", "--since", window)
    assert result.exit_code == 1 and "is not a duration like 30m, 24h or 7d" in result.output


def test_a_second_retrain_waits_for_none_it_refuses(prepared_project, tiny_model_dir, tmp_path):
    from filelock import FileLock

    cli = prepared_project(f"name: t\nbase_model: {tiny_model_dir}\ndata:\n  path: data.jsonl\n")
    with FileLock(str(tmp_path / "runs" / "t" / "retrain.lock")):
        result = cli("retrain", "config.yaml")
    assert result.exit_code == 1 and "another retrain of t is running" in result.output


def test_retrain_with_no_feedback_has_nothing_new(prepared_project, tiny_model_dir):
    cli = prepared_project(f"name: t\nbase_model: {tiny_model_dir}\ndata:\n  path: data.jsonl\n")
    result = cli("retrain", "config.yaml")
    assert result.exit_code == 5 and "nothing new to train on" in result.output

