"""The OpenAI fine-tuning jobs API, driven through the official `openai` client against a real
`tuneloop serve` on the tiny model: the code of OpenAI's fine-tuning guide with only the base URL, the key
and the model name changed; bad files; projects that cannot see each other; cancelling; a DPO job (slow); and
the fine-tune of the default model passing the gate (slow). Killed workers and servers: test_jobs_recovery.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.test_e2e import free_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ticket-triage"
SYSTEM = "Reply with a JSON triage object."
KEYS = "key-acme=acme,key-globex=globex"
ACTIVE = ("validating_files", "queued", "running")


def openai_rows(count: int) -> list[dict]:
    """Ticket-triage rows in OpenAI's chat format, each with its system message, as a user would upload them."""
    rows = [json.loads(line) for line in (EXAMPLE / "data.jsonl").read_text().splitlines()[:count]]
    return [{"messages": [{"role": "system", "content": SYSTEM}, *row["messages"]]} for row in rows]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


class Server:
    def __init__(self, project: Path, model_dir: Path, max_steps: int = 4, config: str | None = None):
        self.project, self.port = project, free_port()
        (project / "data.jsonl").write_text("")
        (project / "config.yaml").write_text(config or f"""
name: jobs
base_model: {model_dir}
data:
  path: data.jsonl
train:
  max_steps: {max_steps}
  eval_steps: 2
  save_steps: 2
  batch_size: 4
  learning_rate: 0.001
eval:
  max_new_tokens: 6
  enforce_gate: false
serve:
  reload_interval: 1
  api_keys: env:TUNELOOP_TEST_KEYS
monitor:
  log_requests: false
api:
  heartbeat_timeout: 4
  worker_threads: 1
""")
        self.base_model = Path(model_dir).name
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELOOP_TEST_KEYS": KEYS}
        self.log = open(self.project / f"server-{time.time_ns()}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tuneloop", "serve", "config.yaml", "--port", str(self.port)],
            cwd=self.project, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                assert self.process.poll() is None, self.output()
                time.sleep(0.3)
        raise AssertionError("the server did not start: " + self.output())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "key-acme") -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def output(self) -> str:
        self.log.flush()
        return "".join(p.read_text()[-4000:] for p in sorted(self.project.glob("server-*.log")))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


def wait_for(client: OpenAI, job_id: str, until=lambda job: job.status in ("succeeded", "failed", "cancelled"),
             timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if until(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    running = Server(tmp_path_factory.mktemp("jobs"), tiny_model_dir).start()
    yield running
    running.stop()


def test_the_fine_tuning_guide_runs_unchanged(server, tmp_path):
    client = server.client()
    training = write_jsonl(tmp_path / "mydata.jsonl", openai_rows(40))

    # The guide's code: upload, create, poll, events, checkpoints, call the model.
    uploaded = client.files.create(file=open(training, "rb"), purpose="fine-tune")  # noqa: SIM115
    job = client.fine_tuning.jobs.create(training_file=uploaded.id, model=server.base_model, suffix="triage",
                                         seed=3)
    assert job.status == "validating_files"
    job = wait_for(client, job.id)
    assert job.status == "succeeded", (job.error, server.output())
    events = client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=100).data
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "My card reader will not pair."}],
        max_tokens=4,
    )
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 4

    assert job.fine_tuned_model == f"ft:{server.base_model}:acme:triage:{job.id}"
    assert job.organization_id == "acme" and job.seed == 3 and job.trained_tokens > 0
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == 4
    messages = [e.message for e in reversed(events)]  # oldest first
    assert any(m.startswith("Test split: 4 rows of the training file held out") for m in messages), messages
    assert any("not enforced (eval.enforce_gate is false)" in m for m in messages), messages
    assert messages[-1] == "The job has successfully completed"
    steps = [e.data for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert sorted(s["step"] for s in steps) == [1, 2, 3, 4] and all(s["total_steps"] == 4 for s in steps)
    assert sorted(c.step_number for c in checkpoints) == [2, 4]
    assert all(c.metrics.valid_loss > 0 and c.metrics.train_loss > 0 for c in checkpoints)
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-4"
    results = client.files.content(job.result_files[0]).text.splitlines()
    assert results[0].startswith("step,") and len(results) > 4

    # Every object carries exactly the fields of the SDK's own types.
    headers = {"Authorization": "Bearer key-acme"}
    raw_job = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job.id}", headers=headers).json()
    assert set(raw_job) == set(openai.types.fine_tuning.FineTuningJob.model_fields)
    raw_event = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job.id}/events", headers=headers).json()["data"][0]
    assert set(raw_event) == set(openai.types.fine_tuning.FineTuningJobEvent.model_fields)
    raw_checkpoint = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job.id}/checkpoints", headers=headers).json()
    assert set(raw_checkpoint["data"][0]) == set(openai.types.fine_tuning.jobs.FineTuningJobCheckpoint.model_fields)
    raw_file = httpx.get(f"{server.url}/v1/files/{uploaded.id}", headers=headers).json()
    assert set(raw_file) == set(openai.types.FileObject.model_fields)
    assert client.files.content(uploaded.id).content == training.read_bytes()

    # Another project sees none of it.
    other = server.client("key-globex")
    assert job.fine_tuned_model not in {m.id for m in other.models.list().data}
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    assert other.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.NotFoundError):
        other.models.delete(job.fine_tuned_model)

    # Deleting the model takes it out of serving at once.
    assert job.fine_tuned_model in {m.id for m in client.models.list().data}
    assert client.models.delete(job.fine_tuned_model).deleted is True
    assert job.fine_tuned_model not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])


def test_a_malformed_training_file_fails_the_job_naming_its_lines(server, tmp_path):
    client = server.client()
    rows = openai_rows(12)
    rows[2] = "{not json"
    rows[6] = {"messages": [{"role": "user", "content": "no answer"}]}
    uploaded = client.files.create(file=write_jsonl(tmp_path / "broken.jsonl", rows).open("rb"), purpose="fine-tune")
    job = wait_for(client, client.fine_tuning.jobs.create(training_file=uploaded.id, model=server.base_model).id)
    assert job.status == "failed"
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert f"broken.jsonl ({uploaded.id}) line 3: invalid JSON" in job.error.message
    assert "line 7: conversation does not end with an assistant turn" in job.error.message
    assert "2 of 12 rows rejected" in job.error.message
    assert job.fine_tuned_model is None


def test_a_few_bad_lines_are_listed_and_the_job_goes_on(server, tmp_path):
    client = server.client()
    rows = openai_rows(40)
    rows[5] = {"messages": [{"role": "robot", "content": "beep"}]}
    uploaded = client.files.create(file=write_jsonl(tmp_path / "mostly.jsonl", rows).open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=uploaded.id, model=server.base_model,
                                         method={"type": "supervised", "supervised": {"hyperparameters": {
                                             "n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 0.5}}})
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 2
    job = wait_for(client, job.id, until=lambda j: j.status in ("queued", "running", "succeeded", "failed"))
    assert job.status != "failed", job.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data]
    assert any("mostly.jsonl" in m and "line 6: unknown or missing role 'robot'" in m for m in messages), messages
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    time.sleep(2)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"  # the worker stopped, nothing finished it


@pytest.mark.slow  # 30-50 s of DPO on two cores; run with -m slow
def test_a_dpo_job_on_openai_preference_rows_reports_preference_accuracy(server, tmp_path):
    client = server.client()
    rows = [{"input": {"messages": row["messages"][:-1]}, "preferred_output": [row["messages"][-1]],
             "non_preferred_output": [{"role": "assistant", "content": "Sorry, I cannot triage this ticket."}]}
            for row in openai_rows(20)]
    uploaded = client.files.create(file=write_jsonl(tmp_path / "prefs.jsonl", rows).open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=uploaded.id, model=server.base_model, suffix="dpo",
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    job = wait_for(client, job.id)
    assert job.status == "succeeded", (job.error, server.output())
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    (verdict,) = [e for e in events if e.message.startswith("Evaluation on")]
    assert "preference_accuracy" in verdict.data["baseline"] and "preference_accuracy" in verdict.data["fine_tuned"]
    assert 0.0 <= verdict.data["fine_tuned"]["preference_accuracy"] <= 1.0


def test_requests_the_api_does_not_take_are_400s_naming_the_parameter(server, tmp_path):
    client = server.client()
    uploaded = client.files.create(file=write_jsonl(tmp_path / "d.jsonl", openai_rows(3)).open("rb"),
                                   purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="cannot be fine-tuned on this server"):
        client.fine_tuning.jobs.create(training_file=uploaded.id, model="gpt-4o-mini-2024-07-18")
    with pytest.raises(openai.BadRequestError, match="training_file: no file 'file-nope'"):
        client.fine_tuning.jobs.create(training_file="file-nope", model=server.base_model)
    with pytest.raises(openai.BadRequestError, match="beta applies to dpo only"):
        client.fine_tuning.jobs.create(training_file=uploaded.id, model=server.base_model, method={
            "type": "supervised", "supervised": {"hyperparameters": {"beta": 0.2}}})
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=(tmp_path / "d.jsonl").open("rb"), purpose="assistants")
    made = [client.fine_tuning.jobs.create(training_file=uploaded.id, model=server.base_model) for _ in range(2)]
    assert all(client.fine_tuning.jobs.cancel(j.id).status == "cancelled" for j in made)
    with pytest.raises(openai.BadRequestError, match="has already cancelled"):
        client.fine_tuning.jobs.cancel(made[0].id)
    page = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in page.data] == [made[1].id] and page.has_more  # newest first
    assert client.fine_tuning.jobs.list(limit=1, after=made[1].id).data[0].id == made[0].id
    assert client.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


@pytest.mark.slow
def test_the_default_model_fine_tuned_through_the_api_passes_the_gate(tmp_path):
    """The bundled ticket-triage example in OpenAI's format, on the default model, with the gate enforced."""
    import yaml

    example = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    rows = [json.loads(line) for line in (EXAMPLE / "data.jsonl").read_text().splitlines()]
    training = write_jsonl(tmp_path / "tickets.jsonl", [
        {"messages": [{"role": "system", "content": example["data"]["system_prompt"]}, *row["messages"]]}
        for row in rows
    ])
    server = Server(tmp_path, Path("smollm2-135m-instruct"), config="""
name: jobs
data:
  path: data.jsonl
eval:
  max_new_tokens: 80
monitor:
  log_requests: false
""").start()
    try:
        client = server.client("unused")
        uploaded = client.files.create(file=training.open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=uploaded.id, model="smollm2-135m-instruct", seed=7,
                                             suffix="triage", method={"type": "supervised", "supervised": {
                                                 "hyperparameters": {"n_epochs": 1}}})
        job = wait_for(client, job.id, timeout=3600)
        events = [e.message for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=1000).data)]
        print("\n".join(e for e in events if not e.startswith("Step ")))
        assert job.status == "succeeded", job.error
        assert any(m.endswith("Gate passed") for m in events), events
        reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=80, messages=[
            {"role": "system", "content": example["data"]["system_prompt"]},
            {"role": "user", "content": "I was charged twice for my Ledgerly plan this month."}])
        print(reply.choices[0].message.content)
    finally:
        server.stop()
