"""The request log the server writes (every request; prompt and answer for the sampled share, personal data
scrubbed first) and the feedback clients send about its completions."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
from openai import OpenAI

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import ServeConfig
from tuneloop.serve import build_engine
from tuneloop.serve.app import create_app
from tuneloop.serve.request_log import RequestLog, RequestRecord, connect, read_feedback, read_requests

BASE = "tiny-base"
KEYS = {"sk-team-a": "team-a", "sk-team-b": "team-b"}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return build_engine(ServeConfig(), BaseModelRef(BASE, tiny_model_dir), {})


@pytest.fixture
def start(serve_app, engine, tmp_path):
    """start(**request log settings) -> (base URL, log URL) of an app on the shared tiny engine."""
    def run(**settings):
        url = f"sqlite:///{tmp_path / 'requests.db'}"
        request_log = RequestLog(url, **settings)
        return serve_app(create_app(engine, ServeConfig(), KEYS, request_log=request_log)), url
    return run


def client(url: str, key: str = "sk-team-a") -> OpenAI:
    return OpenAI(base_url=url, api_key=key, max_retries=0)


def feedback(url: str, key: str = "sk-team-a", **body) -> httpx.Response:
    return httpx.post(f"{url}/feedback", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_every_request_is_logged_with_what_the_client_saw(start):
    url, log_url = start()
    hello = [{"role": "user", "content": "Say hello."}]
    reply = client(url).chat.completions.create(model=BASE, messages=hello, max_tokens=4)
    chunks = list(client(url, "sk-team-b").chat.completions.create(
        model=BASE, messages=hello, max_tokens=3, stream=True, stream_options={"include_usage": True}))
    text = client(url).completions.create(model=BASE, prompt="Once upon", max_tokens=2)

    assert feedback(url, completion_id=reply.id, rating="good").status_code == 200  # waits for the writer
    rows = {row["id"]: row for row in read_requests(connect(log_url), since=time.time() - 60)}
    assert set(rows) == {reply.id, chunks[0].id, text.id}
    chat = rows[reply.id]
    assert chat["project"] == "team-a" and chat["model"] == chat["version"] == BASE
    assert chat["prompt"] == hello and chat["answer"] == reply.choices[0].message.content
    assert (chat["prompt_tokens"], chat["completion_tokens"]) == (reply.usage.prompt_tokens,
                                                                  reply.usage.completion_tokens)
    assert chat["status"] == 200 and chat["finish_reason"] == reply.choices[0].finish_reason
    assert chat["sampled"] and 0 < chat["ttft_ms"] <= chat["latency_ms"]
    streamed = rows[chunks[0].id]
    assert streamed["project"] == "team-b"
    assert streamed["answer"] == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed["completion_tokens"] == chunks[-1].usage.completion_tokens
    assert rows[text.id]["prompt"] == "Once upon" and rows[text.id]["answer"] == text.choices[0].text


def test_feedback_is_stored_for_the_project_that_owns_the_completion(start):
    url, log_url = start()
    reply = client(url).chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=3)

    stored = feedback(url, completion_id=reply.id, rating="bad", correction='{"label": "billing"}',
                      comment="wrong label")
    assert stored.status_code == 200
    body = stored.json()
    assert body["object"] == "feedback" and body["id"].startswith("fb-") and body["completion_id"] == reply.id

    unknown = feedback(url, completion_id="chatcmpl-doesnotexist", rating="good")
    other_project = feedback(url, "sk-team-b", completion_id=reply.id, rating="good")
    for refused in (unknown, other_project):
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "completion_not_found"
    assert "no completion with id" in other_project.json()["error"]["message"]
    assert feedback(url, completion_id=reply.id, rating="meh").status_code == 400
    assert httpx.post(f"{url}/feedback", json={"completion_id": reply.id, "rating": "good"}).status_code == 401

    rows = read_feedback(connect(log_url))
    assert [(r["completion_id"], r["rating"], r["correction"], r["comment"]) for r in rows] == [
        (reply.id, "bad", '{"label": "billing"}', "wrong label")]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hi"}] and rows[0]["version"] == BASE


def test_a_sampled_out_request_keeps_no_content_and_takes_no_feedback(start):
    url, log_url = start(sample_rate=0.0)
    reply = client(url).chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=2)

    refused = feedback(url, completion_id=reply.id, rating="good")
    assert refused.status_code == 404 and "sampled out of the request log" in refused.json()["error"]["message"]
    (row,) = read_requests(connect(log_url), since=0)
    assert row["id"] == reply.id and not row["sampled"] and row["prompt"] is None and row["answer"] is None
    assert row["completion_tokens"] == reply.usage.completion_tokens and row["status"] == 200  # still counted


SECRETS = ["jane.doe@example.com", "+1 415 555 0142", "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX1234"]


def test_personal_data_is_never_written_to_the_log_its_wal_or_the_server_log(start, tmp_path):
    server_log = tmp_path / "server.log"
    handler = logging.FileHandler(server_log)
    root = logging.getLogger()
    root.addHandler(handler)
    level, root.level = root.level, logging.DEBUG
    try:
        url, log_url = start()
        prompt = f"Mail {SECRETS[0]} or call {SECRETS[1]}; my key is {SECRETS[2]}"
        reply = client(url).chat.completions.create(model=BASE, messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=3)
        list(client(url).chat.completions.create(model=BASE, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=3, stream=True))
        assert feedback(url, completion_id=reply.id, rating="bad", correction=f"write to {SECRETS[0]}",
                        comment=f"call {SECRETS[1]}").status_code == 200
        database = tmp_path / "requests.db"
        stored = database.read_bytes() + (tmp_path / "requests.db-wal").read_bytes()
    finally:
        root.removeHandler(handler)
        root.level = level
        handler.close()
    for secret in SECRETS:
        for variant in {secret, secret.replace(" ", "")}:
            assert variant.encode() not in stored
            assert variant.encode() not in server_log.read_bytes()
    (row,) = [r for r in read_requests(connect(log_url), since=0) if r["id"] == reply.id]
    assert row["prompt"][0]["content"] == "Mail [EMAIL] or call [PHONE]; my key is [SECRET]"
    assert row["pii_found"] == 3
    assert read_feedback(connect(log_url))[0]["correction"] == "write to [EMAIL]"


def test_pii_drop_keeps_the_row_but_not_the_text(tmp_path):
    request_log = RequestLog(f"sqlite:///{tmp_path / 'log.db'}", pii="drop")
    request_log.start()
    for i, prompt in enumerate(["no personal data here", f"mail {SECRETS[0]}"]):
        request_log.record(RequestRecord(id=f"r{i}", created=time.time(), project=None, model="m", version="m-v1",
                                         prompt=[{"role": "user", "content": prompt}], answer="o\x00k", status=200))
    request_log.close()
    rows = {r["id"]: r for r in read_requests(connect(f"sqlite:///{tmp_path / 'log.db'}"), since=0)}
    # NUL characters are dropped (PostgreSQL's text cannot hold them)
    assert rows["r0"]["prompt"][0]["content"] == "no personal data here" and rows["r0"]["answer"] == "ok"
    assert rows["r1"]["prompt"] is None and rows["r1"]["answer"] is None and rows["r1"]["pii_found"] == 1


def test_retention_deletes_old_rows_but_keeps_those_with_feedback(tmp_path):
    request_log = RequestLog(f"sqlite:///{tmp_path / 'log.db'}", retention_days=1)
    request_log.start()
    old = time.time() - 2 * 86400
    for name, created in (("old", old), ("old-rated", old), ("new", time.time())):
        request_log.record(RequestRecord(id=name, created=created, project=None, model="m", version="m",
                                         prompt="p", answer="a", status=200))
    request_log.add_feedback("old-rated", None, "bad", correction="better")

    assert request_log.prune() == 1
    request_log.close()
    assert {r["id"] for r in read_requests(connect(f"sqlite:///{tmp_path / 'log.db'}"), since=0)} == {
        "old-rated", "new"}
