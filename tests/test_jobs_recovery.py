"""A job survives a SIGKILLed worker and then a SIGKILLed server in its middle: each time its phase process
dies with its parent, the job is queued again and resumes from its newest checkpoint, and it ends
`succeeded`. Through the official openai client against a real `tuneloop serve` on the tiny model."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from openai import OpenAI

from tests.test_jobs_api import ACTIVE, Server, openai_rows, wait_for, write_jsonl


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append((int(entry.name), command))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _checkpointed(client: OpenAI, job_id: str, step: int):
    """Wait until the job runs and has a checkpoint at `step` or later."""
    return wait_for(client, job_id, timeout=180, until=lambda j: j.status not in ACTIVE or (j.status == "running" and any(
        c.step_number >= step for c in client.fine_tuning.jobs.checkpoints.list(j.id, limit=100).data)))


def _runner_of(server: Server) -> tuple[int, int]:
    """(worker pid, runner pid) of the server's one worker and its running phase."""
    (worker, _), = [c for c in _children(server.process.pid) if " worker " in c[1]]
    (runner, _), = [c for c in _children(worker) if "tuneloop.jobs.runner" in c[1]]
    return worker, runner


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def test_a_job_survives_a_killed_worker_and_then_a_killed_server(tiny_model_dir, tmp_path):
    server = Server(tmp_path, tiny_model_dir, max_steps=20).start()
    try:
        client = server.client()
        uploaded = client.files.create(file=write_jsonl(tmp_path / "t.jsonl", openai_rows(40)).open("rb"),
                                       purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=uploaded.id, model=server.base_model, suffix="k")
        assert _checkpointed(client, job.id, 2).status == "running"

        worker, runner = _runner_of(server)
        os.kill(worker, signal.SIGKILL)  # 1. a worker dies mid-job: the server starts another, the job resumes
        assert _gone(runner)  # nothing trains on unwatched
        reached = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data)
        assert _checkpointed(client, job.id, reached + 2).status == "running"

        _, runner = _runner_of(server)
        os.kill(server.process.pid, signal.SIGKILL)  # 2. the server dies mid-job: its worker and phase die too
        server.process.wait()
        assert _gone(runner)
        server.start()
        done = wait_for(client, job.id, timeout=300)

        events = list(reversed(client.fine_tuning.jobs.list_events(job.id, limit=1000).data))
        messages = [e.message for e in events]
        assert done.status == "succeeded", (done.error, messages, server.output())
        assert sum(m.startswith("Worker lost:") for m in messages) == 2, messages
        assert any("again (attempt 3), from its newest checkpoint" in m for m in messages), messages
        steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]
        assert steps.count(1) == 1 and max(steps) == 20  # each start resumed from a checkpoint, none from step 1
    finally:
        server.stop()
