"""Two workers on two machines' worth of processes share one job queue on PostgreSQL: every job is taken
by exactly one of them. Runs where PostgreSQL's server binaries and psycopg are installed; skipped
elsewhere."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.test_request_log_postgres import postgres_url  # noqa: F401  (a throwaway cluster)
from tuneloop.config import load_config
from tuneloop.jobs.config import resolved_method
from tuneloop.jobs.protocol import JobCreateRequest
from tuneloop.jobs.queue import job_queue
from tuneloop.jobs.store import JobStore, store_url

JOBS = 6


@pytest.mark.slow  # half a minute of worker processes; run with -m slow (it passed on this project's machine)
def test_two_workers_on_one_postgresql_queue_never_take_the_same_job(postgres_url, tiny_model_dir, tmp_path):  # noqa: F811
    (tmp_path / "config.yaml").write_text(f"""
name: shared
base_model: {tiny_model_dir}
data:
  path: data.jsonl
api:
  database_url: "{postgres_url}"
  heartbeat_timeout: 30
  worker_threads: 1
""")
    cfg = load_config(tmp_path / "config.yaml")
    store = JobStore(store_url(cfg.api.database_url, cfg.jobs_dir))
    _, submit = job_queue(cfg.api.database_url, cfg.jobs_dir)
    # Files the data stage rejects whole: each job is one short validation, so the test is about the queue.
    broken = b"{not json\n" * 3
    jobs = []
    for _ in range(JOBS):
        file = store.add_file("team", "broken.jsonl", "fine-tune", broken)
        request = JobCreateRequest(model=tiny_model_dir.name, training_file=file["id"])
        job = store.create_job(project="team", model=tiny_model_dir.name, training_file=file["id"],
                               validation_file=None, suffix=None, seed=0, metadata=None,
                               method=resolved_method(cfg, request))
        submit(job["id"], "validate")
        jobs.append(job["id"])

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "tuneloop", "worker", "config.yaml"], cwd=tmp_path, env=env,
                                stdout=(tmp_path / f"w{i}.log").open("w"), stderr=subprocess.STDOUT) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(store.job(j)["status"] != "failed" for j in jobs):
            time.sleep(0.5)
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(timeout=30)

    takers = {}
    for job_id in jobs:
        job = store.job(job_id)
        assert job["status"] == "failed" and job["error"]["code"] == "invalid_training_file", job
        events, _ = store.events(job_id, None, 100)
        validated = [e["message"] for e in events if e["message"].startswith("Validating training file")]
        assert len(validated) == 1, validated  # taken once, by one worker
        takers[job_id] = re.search(r"\(worker ([^:]+:\d+):", validated[0])[1]
    assert {f"{os.uname().nodename}:{w.pid}" for w in workers} == set(takers.values()), json.dumps(takers)
