"""A job's phases and its recovery without a server or a model: a fine-tune refused by the gate fails the job
naming each metric; a lost worker's job is queued again once per loss and failed after `api.max_attempts`;
only one of two processes recovering at once wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop import pipeline
from tuneloop.artifacts import Adapter, Dataset, EvalReport
from tuneloop.config import load_config
from tuneloop.jobs.config import resolved_method
from tuneloop.jobs.protocol import JobCreateRequest
from tuneloop.jobs.runner import PhaseRun
from tuneloop.jobs.store import JobStore, store_url
from tuneloop.jobs.worker import recover_lost

FAILURE = "rouge_l: +0.0 pts vs the baseline (95 % CI of the difference [-1.2 pts, +1.4 pts]); the whole interval must lie above 0"


@pytest.fixture
def jobs(tmp_path):
    (tmp_path / "config.yaml").write_text("name: j\ndata:\n  path: data.jsonl\napi:\n  heartbeat_timeout: 5\n")
    cfg = load_config(tmp_path / "config.yaml").model_copy(update={"output_dir": tmp_path / "run"})
    store = JobStore(store_url(None, cfg.jobs_dir))
    file = store.add_file("team", "mine.jsonl", "fine-tune", b'{"messages": []}\n')

    def make() -> dict:
        request = JobCreateRequest(model="base", training_file=file["id"])
        return store.create_job(project="team", model="base", training_file=file["id"], validation_file=None,
                                suffix="s", seed=1, metadata=None, method=resolved_method(cfg, request))

    return cfg, store, make


def test_a_fine_tune_the_gate_refuses_fails_the_job_naming_each_metric(jobs, monkeypatch, tmp_path):
    cfg, store, make = jobs
    job = make()
    assert store.claim(job["id"], "validating_files", "validating_files", "w") and store.update(
        job["id"], status="queued", worker=None)
    assert store.claim(job["id"], "queued", "running", "w")
    report = EvalReport(dir=tmp_path, rows=12, baseline={"rouge_l": 0.1}, candidate={"rouge_l": 0.1},
                        difference={"rouge_l": [0.0, -0.012, 0.014]}, gate_metrics=["rouge_l"], gate_passed=False,
                        gate_failures=[FAILURE])
    adapter = Adapter(dir=tmp_path, base_model="base", dataset_hash="h", method="lora", params={},
                      history=[{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "val_loss": 1.7}], train_loss=1.75,
                      val_loss=1.7, train_tokens=99, train_seconds=1.0)
    data = Dataset(dir=tmp_path, train=tmp_path, val=tmp_path, test=tmp_path, hash="h", split_hashes={}, counts={})
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pipeline.RunResult(data, None, adapter, report, None, "no"))

    run = PhaseRun(cfg, store, store.job(job["id"]), "w")
    run.materialize()
    run.train()

    failed = store.job(job["id"])
    assert failed["status"] == "failed" and failed["fine_tuned_model"] is None and failed["worker"] is None
    assert failed["error"]["code"] == "gate_failed"
    assert failed["error"]["message"].startswith("the fine-tune did not beat the baseline on 12 held-out test rows: ")
    assert FAILURE in failed["error"]["message"]
    results = store.file(failed["result_files"][0], "team", content=True)
    assert results["content"].decode().splitlines() == ["step,loss,val_loss", "1,2.0,", "2,1.5,1.7"]
    messages = [e["message"] for e in store.events(job["id"], None, 50)[0]]
    assert any(m.startswith("Evaluation on 12 held-out test rows") and m.endswith("Gate failed") for m in messages)
    assert run.cfg.data.path == Path(run.files["training_file"]) and run.cfg.registry.model_name == f"ft-{job['id']}"


def test_a_lost_worker_s_job_is_queued_again_then_failed_after_max_attempts(jobs):
    cfg, store, make = jobs
    job = make()
    submitted = []

    def lose(worker: str) -> None:
        store.update(job["id"], heartbeat=0.0)  # no sign of life for a long time
        recover_lost(cfg, store, lambda job_id, phase: submitted.append(phase))
        recover_lost(cfg, store, lambda job_id, phase: submitted.append(phase))  # a second recoverer: no effect

    assert store.claim(job["id"], "validating_files", "validating_files", "w1")
    lose("w1")
    assert store.job(job["id"])["status"] == "validating_files"
    assert store.claim(job["id"], "validating_files", "validating_files", "w2")
    assert store.update(job["id"], {"worker": "w2"}, status="queued", worker=None)  # validated this time
    assert store.claim(job["id"], "queued", "running", "w2")
    lose("w2")
    assert store.job(job["id"])["status"] == "queued" and store.job(job["id"])["attempts"] == 1
    assert store.claim(job["id"], "queued", "running", "w3")
    lose("w3")
    assert submitted == ["validate", "train"]  # the first two losses requeue, once each
    lost = store.job(job["id"])
    assert lost["status"] == "failed" and lost["error"]["code"] == "worker_lost"
    assert lost["error"]["message"].startswith("the job's worker was lost 3 times; last: its worker w3 showed")
    messages = [e["message"] for e in store.events(job["id"], None, 50)[0]]
    assert sum(m.startswith("Worker lost:") for m in messages) == 2
