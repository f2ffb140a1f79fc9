"""The server, end to end over HTTP with the official openai client: a tiny base model, two adapters (one
with a trained contract) and a fully fine-tuned version, answered by the continuous-batching engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import SamplingDefaults, ServeConfig
from tuneloop.serve import build_engine
from tuneloop.serve.app import create_app

BASE, ADAPTER, TRIAGE, FULL = "tiny-base", "tiny-adapter", "tiny-triage", "tiny-full"
SYSTEM = "Triage the message. Reply with JSON."
HELLO = [{"role": "user", "content": "Say hello."}]
DEMO_SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "examples/ticket-triage/schema.json").read_text())
LABEL_SCHEMA = {
    "type": "object", "properties": {"label": {"enum": ["a", "b"]}}, "required": ["label"], "additionalProperties": False
}
PROMPTS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    for text in ["My invoice is wrong.", "The app crashes on start.", "How do I export data?", "Cancel my plan please.",
                 "I cannot log in since yesterday, help!", "ok"]
]


@pytest.fixture(scope="module")
def triage_dir(tiny_adapter_dir, tmp_path_factory):
    """The tiny adapter registered with a trained contract: a system prompt and an answer schema."""
    target = tmp_path_factory.mktemp("triage") / "adapter"
    shutil.copytree(tiny_adapter_dir, target)
    (target / "serving.json").write_text(json.dumps({"system_prompt": SYSTEM, "answer_schema": LABEL_SCHEMA}))
    return target


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter_dir, triage_dir):
    versions = {ADAPTER: tiny_adapter_dir, TRIAGE: triage_dir, FULL: tiny_model_dir}
    # float32: answers are compared with plain transformers generate, which runs in float32
    cfg = ServeConfig(dtype="float32", sampling={FULL: SamplingDefaults(max_tokens=3)})
    return build_engine(cfg, BaseModelRef(name=BASE, path=tiny_model_dir), versions), cfg


@pytest.fixture(scope="module")
def base_url(engine):
    import socket
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(*engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def answer(client, model, messages, **kwargs) -> str:
    kwargs = {"max_tokens": 8, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=model, messages=messages, **kwargs).choices[0].message.content


def test_models_list_each_version_with_its_parent(client):
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, ADAPTER, TRIAGE, FULL]
    assert all(m.object == "model" and m.owned_by == "tuneloop" for m in models)
    assert [m.model_extra["parent"] for m in models] == [None, BASE, BASE, BASE]


@pytest.mark.parametrize("model", [BASE, ADAPTER, FULL])
def test_completion_has_openai_shape(client, model):
    reply = client.chat.completions.create(model=model, messages=HELLO, max_tokens=3)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == model
    [choice] = reply.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in {"stop", "length"}
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 <= usage.completion_tokens <= 3
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_limit_gives_length(client):
    reply = client.chat.completions.create(model=BASE, messages=HELLO, max_completion_tokens=1)
    # The tiny model's first greedy token is not the end of turn, so the limit is what stops it.
    assert reply.usage.completion_tokens == 1
    assert reply.choices[0].finish_reason == "length"


def test_sampling_defaults_per_model(client):
    reply = client.chat.completions.create(model=FULL, messages=HELLO)  # no max_tokens: the model's default, 3
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_full_version_is_a_model_of_its_own(client):
    # The "fully fine-tuned" version is a copy of the base weights here: a separate model, the same answers.
    assert answer(client, FULL, PROMPTS[0], max_tokens=3) == answer(client, BASE, PROMPTS[0], max_tokens=3)


def test_mixed_adapters_in_one_batch_answer_as_one_at_a_time(client, engine):
    jobs = [(model, prompt) for prompt in PROMPTS for model in (BASE, ADAPTER, TRIAGE, FULL)]
    alone = [answer(client, model, prompt, max_tokens=6) for model, prompt in jobs]
    steps_before = engine[0].stats["steps"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: answer(client, *job, max_tokens=6), jobs))
    assert together == alone
    # They really ran together: far fewer steps than one request at a time would take.
    assert engine[0].stats["steps"] - steps_before < len(jobs) * 6 / 2
    assert [a for (m, _), a in zip(jobs, alone) if m == BASE] != [a for (m, _), a in zip(jobs, alone) if m == ADAPTER]


def test_system_prompt_is_encoded_once_per_model(client, engine, triage_dir):
    eng = engine[0]
    before = dict(eng.stats)
    answer(client, TRIAGE, PROMPTS[1], max_tokens=2)
    answer(client, TRIAGE, PROMPTS[2], max_tokens=2)
    second_prefill = eng.stats["prompt_tokens_computed"]
    answer(client, TRIAGE, PROMPTS[3], max_tokens=2)
    computed = eng.stats["prompt_tokens_computed"] - second_prefill
    prompt_tokens = client.chat.completions.create(model=TRIAGE, messages=PROMPTS[3], max_tokens=1).usage.prompt_tokens
    assert eng.stats["prefix_hits"] > before["prefix_hits"]
    assert computed < prompt_tokens - 5  # the system turn came from the cache
    # Cached per version: the same system prompt has a cache of its own for the adapter and for the base model.
    answer(client, BASE, PROMPTS[3], max_tokens=1)
    answer(client, BASE, PROMPTS[2], max_tokens=1)
    def cached(owner):
        return {prefix for key, prefix in eng.prefix_keys() if key == owner}

    assert cached(str(triage_dir)) & cached("base")


def test_prefix_cache_does_not_change_answers(client, tiny_model_dir, tiny_adapter_dir):
    import asyncio

    from tuneloop.serve.engine import Completion, EngineRequest, Sampling

    uncached = build_engine(ServeConfig(dtype="float32", prefix_cache_size=0), BaseModelRef(BASE, tiny_model_dir), {ADAPTER: tiny_adapter_dir})

    async def run():
        texts = []
        for prompt in PROMPTS[:3]:
            async for event in uncached.generate(EngineRequest(ADAPTER, Sampling(max_tokens=6), messages=prompt)):
                if isinstance(event, Completion):
                    texts.append(event.text)
        await uncached.close()
        return texts

    assert asyncio.run(run()) == [answer(client, ADAPTER, p, max_tokens=6) for p in PROMPTS[:3]]
    assert uncached.stats["prefix_hits"] == 0


def test_version_system_prompt_applied(client):
    user_only = [PROMPTS[0][1]]
    implicit = client.chat.completions.create(model=TRIAGE, messages=user_only, max_tokens=6, temperature=0)
    explicit = client.chat.completions.create(model=TRIAGE, messages=PROMPTS[0], max_tokens=6, temperature=0)
    assert implicit.usage.prompt_tokens == explicit.usage.prompt_tokens
    assert implicit.choices[0].message.content == explicit.choices[0].message.content
    # A version without a contract keeps the chat template's own default.
    plain = client.chat.completions.create(model=ADAPTER, messages=user_only, max_tokens=1)
    assert plain.usage.prompt_tokens != explicit.usage.prompt_tokens


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


def test_completions_endpoint(client):
    reply = client.completions.create(model=ADAPTER, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    [choice] = reply.choices
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 5
    chunks = list(client.completions.create(model=ADAPTER, prompt="The capital of France is", max_tokens=5,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 5


def test_seed_repeats_sampling_without_touching_global_rng(client):
    import torch

    state = torch.get_rng_state()
    kwargs = dict(model=ADAPTER, messages=HELLO, max_tokens=12, temperature=1.5)
    first, again = answer(client, seed=7, **kwargs), answer(client, seed=7, **kwargs)
    others = {answer(client, seed=s, **kwargs) for s in range(8, 12)}
    assert first == again and others - {first}
    assert torch.equal(torch.get_rng_state(), state)


def test_stop_string_truncates(client):
    full = answer(client, ADAPTER, HELLO)
    assert len(full) >= 4, f"need a longer greedy answer to cut: {full!r}"
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    kwargs = dict(model=ADAPTER, messages=HELLO, max_tokens=8, temperature=0, stop=[stop, "unlikely stop string"])
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(**kwargs, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_disconnect_frees_the_slot(base_url, engine):
    body = {"model": BASE, "messages": HELLO, "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        lines = (line for line in response.iter_lines() if '"content"' in line)
        next(lines), next(lines)  # generation is under way
    import time

    deadline = time.monotonic() + 10
    while engine[0].running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine[0].running() == 0


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
    [{"messages": []}, {"messages": [{"role": "user"}]}, {"max_tokens": 0}, {"temperature": 5},
     {"response_format": {"type": "json_schema"}}],
)
def test_invalid_request_is_400(client, bad):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": BASE, "messages": HELLO, **bad})
    assert caught.value.type == "invalid_request_error" and caught.value.param


@pytest.mark.parametrize(
    "param, value",
    [("n", 2), ("logprobs", True), ("presence_penalty", 0.5), ("logit_bias", {"1": 5}),
     ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}])],
)
def test_unsupported_non_default_parameter_is_400_naming_it(client, param, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=BASE, messages=HELLO, max_tokens=2, **{param: value})
    assert caught.value.param == param and param in caught.value.message


def test_defaults_common_clients_send_are_accepted(client):
    reply = client.chat.completions.create(
        model=BASE, messages=HELLO, max_tokens=2, n=1, logprobs=False, presence_penalty=0, frequency_penalty=0,
        user="u-1", metadata={"team": "x"}, store=False, tool_choice="none",
    )
    assert reply.choices[0].finish_reason in {"stop", "length"}


def test_unknown_parameter_is_400(base_url):
    body = {"model": BASE, "messages": HELLO, "max_tokens": 2, "guided_choice": ["a"]}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "guided_choice"


def test_missing_messages_is_openai_error(base_url):
    response = httpx.post(f"{base_url}/v1/chat/completions", json={"model": BASE})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "messages: Field required",
        "type": "invalid_request_error",
        "param": "messages",
        "code": None,
    }


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=BASE, prompt="word " * 3000, max_tokens=2)
    assert caught.value.param == "prompt" and "context" in caught.value.message


def test_health(base_url):
    response = httpx.get(f"{base_url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "models": [BASE, ADAPTER, TRIAGE, FULL]}




@pytest.mark.parametrize("schema", [LABEL_SCHEMA, DEMO_SCHEMA], ids=["labels", "demo"])
def test_json_schema_answers_validate(client, schema):
    import jsonschema

    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(
            lambda prompt: client.chat.completions.create(
                model=ADAPTER, messages=prompt, max_tokens=150, temperature=0, response_format=response_format
            ),
            PROMPTS,
        ))
    finished = [r.choices[0].message.content for r in replies if r.choices[0].finish_reason == "stop"]
    assert finished, "no constrained answer ended by itself"
    for text in finished:
        jsonschema.validate(json.loads(text), schema)
    # Unconstrained, the tiny random model writes no JSON at all.
    free = [answer(client, ADAPTER, prompt, max_tokens=20) for prompt in PROMPTS]
    assert not any(_parses(text) for text in free)


def test_json_object_answers_parse(client):
    reply = client.chat.completions.create(model=BASE, messages=HELLO, max_tokens=200, temperature=0,
                                           response_format={"type": "json_object"}, stream=True)
    chunks = list(reply)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if chunks[-2].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


def test_unusable_schema_is_400(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=BASE, messages=HELLO, max_tokens=2, response_format=bad)
    assert caught.value.param == "response_format"


def test_enforce_schema_constrains_versions_with_a_schema(tiny_model_dir, triage_dir, tiny_adapter_dir, serve_app):
    import jsonschema

    cfg = ServeConfig(enforce_schema=True)
    engine = build_engine(cfg, BaseModelRef(BASE, tiny_model_dir), {TRIAGE: triage_dir, ADAPTER: tiny_adapter_dir})
    enforced = OpenAI(base_url=serve_app(create_app(engine, cfg)), api_key="unused", max_retries=0)
    reply = enforced.chat.completions.create(model=TRIAGE, messages=[PROMPTS[0][1]], max_tokens=60, temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), LABEL_SCHEMA)
    # A version without a schema answers freely.
    assert not _parses(answer(enforced, ADAPTER, HELLO, max_tokens=20))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_answers_equal_transformers_and_peft_generate(client, tiny_model_dir, tiny_adapter_dir):
    """The engine's own attention and stacked-LoRA path against plain `generate` on the PEFT model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_adapter_dir).eval()
    for model_name, model in ((BASE, base), (ADAPTER, tuned)):
        for prompt in PROMPTS[:3]:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=8, do_sample=False)
            expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            assert answer(client, model_name, prompt, max_tokens=8) == expected
