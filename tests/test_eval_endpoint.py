"""Evaluating an OpenAI-compatible endpoint: real HTTP on loopback through the `openai` client, retries
with back-off, concurrency, usage, and `tuneloop serve`'s own app evaluated through `tuneloop eval`."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tuneloop.errors import TuneloopError
from tuneloop.evaluate.endpoint import Endpoint, generate_answers

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ticket-triage"


def prompt(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def test_answers_keep_their_order_with_usage_latency_and_the_key(openai_stub):
    in_flight, peak, lock = [0], [0], threading.Lock()

    def respond(body, index):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.2)
        with lock:
            in_flight[0] -= 1
        return f"echo: {body['messages'][-1]['content']}"

    url, seen = openai_stub(respond)
    endpoint = Endpoint(url, "stub-model", api_key="sekret", concurrency=3)

    answers = generate_answers(endpoint, [prompt(f"q{i}") for i in range(7)], 16, "candidate")

    assert [a.text for a in answers] == [f"echo: q{i}" for i in range(7)]
    assert all(a.prompt_tokens == 7 and a.completion_tokens == 3 and a.latency_ms >= 200 for a in answers)
    assert 1 < peak[0] <= 3  # requests overlap, never more than the configured concurrency
    assert {s["authorization"] for s in seen} == {"Bearer sekret"}
    assert seen[0]["body"]["model"] == "stub-model" and seen[0]["body"]["max_tokens"] == 16
    assert seen[0]["body"]["temperature"] == 0


def test_rate_limits_and_server_errors_are_retried_with_back_off(openai_stub):
    url, seen = openai_stub(lambda body, index: {0: 429, 1: 500}.get(index, "fine"))
    started = time.perf_counter()

    answers = generate_answers(Endpoint(url, "m", max_retries=2, concurrency=1), [prompt("q")], 8, "candidate")

    assert [a.text for a in answers] == ["fine"]
    assert len(seen) == 3
    assert time.perf_counter() - started > 0.7  # back-off: about 0.5 s, then about 1 s (less up to 25 % jitter)


@pytest.mark.parametrize(
    "reply, shown",
    [
        ("<html><body>Sign in</body></html>", "Sign in"),  # a login page answering with 200
        ('{"object": "list", "data": []}', "list"),  # JSON, but not a chat completion
    ],
    ids=["html", "json-without-choices"],
)
def test_a_reply_that_is_not_a_chat_completion_is_an_error_not_an_empty_answer(openai_stub, reply, shown):
    from fastapi.responses import Response

    media = "text/html" if reply.startswith("<") else "application/json"
    url, seen = openai_stub(lambda body, index: Response(reply, media_type=media))

    with pytest.raises(TuneloopError, match="not a chat completion") as err:
        generate_answers(Endpoint(url, "m", max_retries=0), [prompt("q")], 8, "candidate")
    assert shown in str(err.value)
    assert len(seen) == 1


def test_a_timed_out_request_is_retried(openai_stub):
    url, seen = openai_stub(lambda body, index: time.sleep(1.5) or "late" if index == 0 else "in time")
    answers = generate_answers(Endpoint(url, "m", max_retries=1, timeout_s=0.5), [prompt("q")], 8, "candidate")
    assert [a.text for a in answers] == ["in time"] and len(seen) == 2


def test_the_retry_count_is_configurable_and_a_final_failure_is_one_clear_error(openai_stub):
    url, seen = openai_stub(lambda body, index: 503 if index < 2 else "too late")
    with pytest.raises(TuneloopError, match=r"model 'm'.*503"):
        generate_answers(Endpoint(url, "m", max_retries=1), [prompt("q")], 8, "candidate")
    assert len(seen) == 2  # the first try and one retry


def test_a_lost_connection_is_retried_then_reported():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TuneloopError, match="APIConnectionError"):
        generate_answers(Endpoint(f"http://127.0.0.1:{port}/v1", "m", max_retries=1), [prompt("q")], 8, "candidate")


def test_cli_evaluates_tuneloop_serve_as_an_endpoint(tiny_model_dir, serve_app, prepared_project, tmp_path, monkeypatch):
    from tuneloop.artifacts import BaseModelRef
    from tuneloop.config import ServeConfig
    from tuneloop.serve import build_engine
    from tuneloop.serve.app import create_app

    url = serve_app(create_app(build_engine(ServeConfig(), BaseModelRef("tiny-served", tiny_model_dir), {})))
    monkeypatch.setenv("TUNELOOP_TEST_KEY", "unused-by-serve")
    cli = prepared_project(f"""
name: endpoint-cli
base_model: {tiny_model_dir}
data:
  path: data.jsonl
  answer_schema: {EXAMPLE / 'schema.json'}
eval:
  max_new_tokens: 5
  batch_size: 1
  bootstrap_resamples: 200
  endpoint:
    base_url: {url}
    model: tiny-served
    api_key_env: TUNELOOP_TEST_KEY
    concurrency: 2
""")

    result = cli("eval", "config.yaml", "--model", "endpoint", "--gate")

    assert result.exit_code == 3, result.output  # the same model as the baseline cannot beat it
    assert "schema compliance" in result.output and "gate FAILED" in result.output
    eval_dir = tmp_path / "runs" / "endpoint-cli" / "eval"
    served = json.loads((eval_dir / "candidate" / "scored.json").read_text())["rows"]
    local = json.loads((eval_dir / "baseline" / "scored.json").read_text())["rows"]
    assert len(served) == len(local) == 4
    assert all(r["prompt_tokens"] > 0 and 0 < r["completion_tokens"] <= 5 and r["latency_ms"] > 0 for r in served)
    # Greedy answers from the served base model are the local baseline's answers: same weights and template.
    assert [r["answer"] for r in served] == [r["answer"] for r in local]


def test_cli_says_which_api_key_variable_is_missing(tiny_model_dir, prepared_project, monkeypatch):
    monkeypatch.delenv("TUNELOOP_NO_SUCH_KEY", raising=False)
    cli = prepared_project(f"""
name: endpoint-key
base_model: {tiny_model_dir}
data:
  path: data.jsonl
eval:
  endpoint: {{base_url: "http://127.0.0.1:9/v1", model: m, api_key_env: TUNELOOP_NO_SUCH_KEY}}
""")
    result = cli("eval", "config.yaml", "--model", "endpoint")
    assert result.exit_code == 1
    assert "environment variable TUNELOOP_NO_SUCH_KEY (the API key) is not set" in result.output
