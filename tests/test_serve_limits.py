"""What makes the server safe to put in front of users: API keys per project, limits, capacity, errors
that leak nothing, Prometheus metrics and a graceful shutdown."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import ServeConfig
from tuneloop.errors import TuneloopError
from tuneloop.serve import build_engine
from tuneloop.serve.app import create_app
from tuneloop.serve.engine import ServedModel
from tuneloop.serve.keys import load_api_keys

BASE = "tiny-base"
HELLO = [{"role": "user", "content": "Say hello."}]
KEYS = {"sk-team-a": "team-a", "sk-team-b": "team-b"}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return build_engine(ServeConfig(), BaseModelRef(BASE, tiny_model_dir), {})


@pytest.fixture
def start(serve_app, engine):
    """start(**serve config) -> base URL (/v1) of an app on the shared tiny engine with these limits."""
    def run(api_keys=KEYS, **settings):
        return serve_app(create_app(engine, ServeConfig(**settings), api_keys))
    return run


def test_api_key_required(start):
    url = start()
    with pytest.raises(openai.AuthenticationError) as caught:
        OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).chat.completions.create(model=BASE, messages=HELLO)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    missing = httpx.post(f"{url}/chat/completions", json={"model": BASE, "messages": HELLO})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"
    reply = OpenAI(base_url=url, api_key="sk-team-b", max_retries=0).chat.completions.create(
        model=BASE, messages=HELLO, max_tokens=2)
    assert reply.usage.completion_tokens <= 2
    assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200  # probes need no key


def test_keys_from_a_file_or_the_environment(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("sk-1: support\nsk-2: billing\n")
    assert load_api_keys(str(keys_file), {}) == {"sk-1": "support", "sk-2": "billing"}
    assert load_api_keys("env:TL_KEYS", {"TL_KEYS": "sk-1=support, sk-2=billing"}) == {"sk-1": "support", "sk-2": "billing"}
    with pytest.raises(TuneloopError, match="TL_KEYS is not set"):
        load_api_keys("env:TL_KEYS", {})
    with pytest.raises(TuneloopError, match="pair 2: expected key=project"):
        load_api_keys("env:TL_KEYS", {"TL_KEYS": "sk-1=support,sk-2"})
    keys_file.write_text("- just a list\n")
    with pytest.raises(TuneloopError, match="must map each key to its project"):
        load_api_keys(str(keys_file), {})


def test_body_size_cap_is_413(start):
    url = start(api_keys=None, max_request_bytes=2000)
    big = {"model": BASE, "messages": [{"role": "user", "content": "x" * 5000}]}
    response = httpx.post(f"{url}/chat/completions", json=big)
    assert response.status_code == 413 and "max_request_bytes" in response.json()["error"]["message"]

    def chunked():
        yield json.dumps(big).encode()

    assert httpx.post(f"{url}/chat/completions", content=chunked()).status_code == 413


def test_max_tokens_limits(start):
    client = OpenAI(base_url=start(api_keys=None, max_tokens_cap=50), api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=BASE, messages=HELLO, max_tokens=51)
    assert caught.value.param == "max_tokens" and "max_tokens_cap" in caught.value.message
    long_prompt = "hello " * 2030  # nearly fills the tiny model's 2048-token context
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=BASE, prompt=long_prompt, max_tokens=40)
    assert caught.value.param == "max_tokens" and "remain" in caught.value.message
    clamped = client.completions.create(model=BASE, prompt=long_prompt, temperature=0)  # no max_tokens: fit it
    assert clamped.usage.prompt_tokens + clamped.usage.completion_tokens <= 2048


def test_full_queue_is_429_with_retry_after(start):
    url = start(api_keys=None, max_batch_size=1, max_queue=1)
    body = {"model": BASE, "messages": HELLO, "max_tokens": 1500, "stream": True}
    streams = [httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        opened = list(pool.map(lambda s: s.__enter__(), streams))
    try:
        assert all(r.status_code == 200 for r in opened)
        refused = httpx.post(f"{url}/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for stream in streams:
            stream.__exit__(None, None, None)


class _FailingEngine:
    def models(self):
        return [ServedModel(name=BASE, path=None)]

    def generate(self, request):
        raise RuntimeError("secret detail: /etc/credentials")

    async def start(self):
        pass

    async def close(self):
        pass


def test_internal_error_answers_a_request_id_and_logs_the_rest(serve_app, caplog):
    url = serve_app(create_app(_FailingEngine(), ServeConfig()))
    with caplog.at_level(logging.ERROR, logger="tuneloop.serve"):
        response = httpx.post(f"{url}/chat/completions", json={"model": BASE, "messages": HELLO})
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "secret" not in response.text and "request id req_" in message
    request_id = message.split("request id ")[1].rstrip(")")
    assert any(request_id in record.getMessage() and record.exc_info for record in caplog.records)


def test_metrics_add_up_to_what_clients_got(start):
    url = start(api_keys=None)
    client = OpenAI(base_url=url, api_key="unused", max_retries=0)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(
            lambda n: client.chat.completions.create(model=BASE, messages=HELLO, max_tokens=3 + n % 3), range(8)
        ))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    scraped = httpx.get(url.removesuffix("/v1") + "/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scraped.text) for s in family.samples
    }
    label = (("model_name", BASE),)
    successes = sum(v for (name, labels), v in samples.items() if name == "vllm:request_success_total")
    assert successes == 8  # each app counts its own requests, though the engine is shared
    assert samples[("vllm:generation_tokens_total", label)] == sum(r.usage.completion_tokens for r in replies)
    assert samples[("vllm:prompt_tokens_total", label)] == sum(r.usage.prompt_tokens for r in replies)
    assert samples[("vllm:time_to_first_token_seconds_count", label)] == 8
    assert samples[("vllm:e2e_request_latency_seconds_count", label)] == 8
    assert samples[("vllm:num_requests_running", label)] == 0 and samples[("vllm:num_requests_waiting", label)] == 0
    assert samples[("tuneloop:requests_rejected_total", (("status", "404"),))] == 1


def test_sigterm_lets_running_requests_finish(tiny_model_dir, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "config.yaml").write_text(f"name: sigterm\nbase_model: {tiny_model_dir}\ndata: {{path: data.jsonl}}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "tuneloop", "serve", "config.yaml", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read() if server.poll() else "no start"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        models = httpx.get(f"{url}/v1/models").json()["data"]
        body = {"model": models[0]["id"], "messages": HELLO, "max_tokens": 300, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        chunks = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and not chunks:
                    server.send_signal(signal.SIGTERM)  # mid-answer
                chunks.append(line)
        assert "data: [DONE]" in chunks  # the answer ran to its end after SIGTERM
        usage = [json.loads(c[6:])["usage"] for c in chunks if c.startswith("data: {") and '"usage":{' in c]
        assert usage and usage[-1]["completion_tokens"] > 0
        # uvicorn re-raises the signal it caught once it has shut down, so the exit status reports SIGTERM
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.stdout.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()


def test_registry_changes_reach_traffic_without_a_restart(tiny_model_dir, tiny_adapter_dir, tmp_path, serve_app, caplog):
    """New versions and a moved bare name are served within the reload interval; a stream that started on
    the old version ends on it; a version that does not load leaves the previous one serving."""
    import shutil

    from tuneloop.serve.contract import served_models

    v1, v2, broken = tmp_path / "v1", tmp_path / "v2", tmp_path / "broken"
    shutil.copytree(tiny_adapter_dir, v1)
    shutil.copytree(tiny_model_dir, v2)  # a "fully fine-tuned" version: the base weights as a model of their own
    shutil.copytree(tiny_adapter_dir, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not weights")
    base = BaseModelRef(BASE, tiny_model_dir)
    registry = {"triage": v1, "triage-v1": v1}
    cfg = ServeConfig(reload_interval=0.5)
    engine = build_engine(cfg, base, dict(registry))
    client = OpenAI(base_url=serve_app(create_app(engine, cfg, versions=lambda: served_models(base, dict(registry))[1])),
                    api_key="unused", max_retries=0)

    def names():
        return [m.id for m in client.models.list().data]

    def wait_for(condition):
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, "the server did not follow the registry within 10 s"
            time.sleep(0.1)

    def answer(model):
        return client.chat.completions.create(model=model, messages=HELLO, max_tokens=20, temperature=0
                                              ).choices[0].message.content

    on_v1, on_v2 = answer("triage"), answer(BASE)  # v2 has the base model's weights
    assert on_v1 != on_v2
    stream = client.chat.completions.create(model="triage", messages=HELLO, max_tokens=1500, temperature=0, stream=True)
    next(stream)  # under way on v1
    registry.update({"triage": v2, "triage-v2": v2})  # v2 registered and promoted
    wait_for(lambda: "triage-v2" in names())
    wait_for(lambda: answer("triage") == on_v2)
    [running] = [item for w in engine._weights.values() for item in w.running if len(item.generated) > 20]
    assert running.adapter == str(v1) and not running.done  # the stream goes on on the version it started with
    stream.close()

    with caplog.at_level(logging.ERROR, logger="tuneloop.serve"):
        registry.update({"triage": broken, "triage-v3": broken})
        wait_for(lambda: any("not loaded" in r.getMessage() for r in caplog.records))
    assert "triage-v3" not in names()  # never a 200 from a version that did not load
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="triage-v3", messages=HELLO, max_tokens=2)
    assert answer("triage") == on_v2
