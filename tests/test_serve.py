"""The server, end to end over HTTP with the official openai client: a tiny base model plus one adapter."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import uvicorn
from openai import OpenAI

from tuneloop.artifacts import BaseModelRef
from tuneloop.serve.app import create_app
from tuneloop.serve.engine import Engine

BASE, ADAPTER = "tiny-base", "tiny-adapter"
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter_dir) -> Engine:
    return Engine(BaseModelRef(name=BASE, path=tiny_model_dir), {ADAPTER: tiny_adapter_dir})


@pytest.fixture(scope="module")
def base_url(engine):
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]  # port=0: the OS picked a free one
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_base_then_adapters(client):
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, ADAPTER]
    assert all(m.object == "model" and m.owned_by == "tuneloop" for m in models)


@pytest.mark.parametrize("model", [BASE, ADAPTER])
def test_completion_has_openai_shape(client, model):
    reply = client.chat.completions.create(model=model, messages=HELLO, max_tokens=8)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == model
    [choice] = reply.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in {"stop", "length"}
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_limit_gives_length(client):
    reply = client.chat.completions.create(model=BASE, messages=HELLO, max_completion_tokens=1)
    # The tiny model's first greedy token is not the end of turn, so the limit is what stops it.
    assert reply.usage.completion_tokens == 1
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("model", [BASE, ADAPTER])
def test_stream_matches_completion(client, model):
    kwargs = dict(model=model, messages=HELLO, max_tokens=8, temperature=0)
    reply = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage


def test_stop_string_truncates(client):
    full = client.chat.completions.create(model=ADAPTER, messages=HELLO, max_tokens=8).choices[0].message.content
    assert len(full) >= 4, f"need a longer greedy answer to cut: {full!r}"
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    kwargs = dict(model=ADAPTER, messages=HELLO, max_tokens=8, stop=[stop, "unlikely stop string"])
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(**kwargs, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_disconnect_stops_generation(base_url):
    body = {"model": BASE, "messages": HELLO, "max_tokens": 100_000, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        lines = (line for line in response.iter_lines() if '"content"' in line)
        next(lines), next(lines)  # generation is under way
    # Were the abandoned generation still running, it would hold the model for minutes.
    reply = httpx.post(f"{base_url}/v1/chat/completions", json={**body, "max_tokens": 2, "stream": False}, timeout=10)
    assert reply.status_code == 200


def test_adapter_changes_the_output(client, engine):
    def answer(model: str) -> str:
        return client.chat.completions.create(model=model, messages=HELLO, max_tokens=8).choices[0].message.content

    if answer(BASE) != answer(ADAPTER):
        return
    # Equal greedy answers by chance: the adapter must still change the logits.
    import torch

    ids = engine.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        with engine.model.disable_adapter():
            base_logits = engine.model(input_ids=ids).logits
        engine.model.set_adapter(ADAPTER)
        adapter_logits = engine.model(input_ids=ids).logits
    assert not torch.allclose(base_logits, adapter_logits)


def test_text_parts_are_joined(client):
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello."}]
    reply = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": parts}], max_tokens=2)
    joined = [{"role": "user", "content": "Say\nhello."}]
    same = client.chat.completions.create(model=BASE, messages=joined, max_tokens=2)
    assert reply.usage.prompt_tokens == same.usage.prompt_tokens
    assert reply.choices[0].message.content == same.choices[0].message.content


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=HELLO, max_tokens=2)
    assert caught.value.code == "model_not_found"
    assert BASE in caught.value.message and ADAPTER in caught.value.message


@pytest.mark.parametrize(
    "bad",
    [{"messages": []}, {"messages": [{"role": "user"}]}, {"n": 2}, {"max_tokens": 0}, {"temperature": 5}],
)
def test_invalid_request_is_400(client, bad):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": BASE, "messages": HELLO, **bad})
    assert caught.value.type == "invalid_request_error" and caught.value.param


def test_missing_messages_is_openai_error(base_url):
    response = httpx.post(f"{base_url}/v1/chat/completions", json={"model": BASE})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "messages: Field required",
        "type": "invalid_request_error",
        "param": "messages",
        "code": None,
    }


def test_health(base_url):
    response = httpx.get(f"{base_url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "models": [BASE, ADAPTER]}
