"""serve.vllm: the command vLLM is started with, and the engine run against a scripted stand-in for vLLM's server
(tests/vllm_standin.py) through the real subprocess path; a `gpu` test runs real vLLM."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import socket
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tuneloop.config import ServeConfig, VllmConfig
from tuneloop.errors import TuneloopError
from tuneloop.serve import vllm
from tuneloop.serve.engine import (
    Completion,
    EngineRequest,
    InvalidRequestError,
    Sampling,
    ServedModel,
    UnknownModelError,
)
from tuneloop.serve.vllm import VLLM_ENV, VllmEngine, vllm_command

STANDIN = str(Path(__file__).with_name("vllm_standin.py"))
BASE = ServedModel(name="tickets", path=Path("/models/base"))


def adapter(name: str, path: Path) -> ServedModel:
    return ServedModel(name=name, path=path, parent="tickets", kind="adapter")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def record(tmp_path) -> Path:
    return tmp_path / "requests.jsonl"


@pytest.fixture
def serve_config(record):
    """`config(*extra_args)`: a ServeConfig running the stand-in on a free port."""

    def config(*extra_args: str, startup_timeout: float = 30.0) -> ServeConfig:
        return ServeConfig(
            engine="vllm",
            vllm=VllmConfig(
                command=[sys.executable, STANDIN],
                port=free_port(),
                startup_timeout=startup_timeout,
                extra_args=["--record", str(record), *extra_args],
            ),
        )

    return config


@pytest.fixture
def versions(tmp_path) -> dict[str, ServedModel]:
    """Three adapter versions whose directories exist, and one whose directory does not."""
    made = {name: adapter(name, tmp_path / name) for name in ("v1", "v2", "v3")}
    for version in made.values():
        version.path.mkdir()
    made["missing"] = adapter("missing", tmp_path / "not-there")
    return made


@asynccontextmanager
async def running(engine: VllmEngine):
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def received(record: Path, path: str) -> list[dict]:
    if not record.exists():
        return []
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    return [entry["body"] for entry in entries if entry.get("path") == path]


def chat(model: str, content: str = "hello there", **sampling) -> EngineRequest:
    return EngineRequest(
        model=model, sampling=Sampling(**{"max_tokens": 7, **sampling}), messages=[{"role": "user", "content": content}]
    )


async def collect(engine: VllmEngine, request: EngineRequest) -> list[str | Completion]:
    return [item async for item in engine.generate(request)]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent to reap it counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- the command ---------------------------------------------------------------------------------------------------


def test_command_for_the_base_model():
    cfg = ServeConfig(vllm=VllmConfig(port=8123, max_loras=4, max_lora_rank=32, extra_args=["--dtype", "bfloat16"]))

    assert vllm_command(cfg, BASE) == [
        "vllm", "serve", "/models/base",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--served-model-name", "tickets",
        "--enable-lora",
        "--max-loras", "4",
        "--max-lora-rank", "32",
        "--dtype", "bfloat16",
    ]  # fmt: skip  (no --lora-modules: adapters load at run time, so one that fails does not stop vLLM)
    assert VLLM_ENV == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def test_full_version_is_refused_with_the_builtin_engine_named():
    full = ServedModel(name="tickets-full", path=Path("/runs/full"), parent="tickets", kind="full")
    with pytest.raises(TuneloopError, match=r"tickets-full.*serve\.engine: builtin"):
        VllmEngine(ServeConfig(), BASE, [full])
    with pytest.raises(TuneloopError, match="not a LoRA adapter of tickets"):
        VllmEngine(ServeConfig(), BASE, [ServedModel(name="other", path=Path("/x"), parent="llama", kind="adapter")])


# --- against the stand-in ------------------------------------------------------------------------------------------


def test_start_serves_the_versions_and_sync_follows_the_registry(serve_config, versions, record):
    v1, v2, v3 = versions["v1"], versions["v2"], versions["v3"]

    cfg = serve_config()

    async def scenario():
        async with running(VllmEngine(cfg, BASE, [v1, v2])) as engine:
            assert [(m.name, m.parent) for m in engine.models()] == [("tickets", None), ("v1", "tickets"),
                                                                      ("v2", "tickets")]
            loads = [{"lora_name": v.name, "lora_path": str(v.path)} for v in (v1, v2, v3)]
            assert received(record, "/v1/load_lora_adapter") == loads[:2]  # loaded at run time, after /health
            cards = httpx.get(f"http://127.0.0.1:{cfg.vllm.port}/v1/models", trust_env=False).json()["data"]
            assert {card["id"] for card in cards} == {"tickets", "v1", "v2"}

            assert await engine.sync([v2, v3]) == [v2, v3]
            assert [m.name for m in engine.models()] == ["tickets", "v2", "v3"]
            assert received(record, "/v1/load_lora_adapter") == loads
            assert received(record, "/v1/unload_lora_adapter") == [{"lora_name": "v1"}]

            await engine.sync([v2, v3])  # in step already: nothing to do
            assert len(received(record, "/v1/load_lora_adapter")) == 3
            assert len(received(record, "/v1/unload_lora_adapter")) == 1

    asyncio.run(scenario())


def test_a_refused_load_leaves_the_other_versions_served(serve_config, versions, record, caplog):
    v1, v2, missing = versions["v1"], versions["v2"], versions["missing"]

    async def scenario():
        async with running(VllmEngine(serve_config(), BASE, [v1])) as engine:
            with caplog.at_level(logging.WARNING, logger="tuneloop.serve.vllm"):
                served = await engine.sync([v1, missing, v2])
            assert served == [v1, v2]
            assert [m.name for m in engine.models()] == ["tickets", "v1", "v2"]
            assert [body["lora_name"] for body in received(record, "/v1/load_lora_adapter")] == ["v1", "missing", "v2"]
            with pytest.raises(UnknownModelError):
                engine.generate(chat("missing"))

    asyncio.run(scenario())
    assert "vLLM refused to load missing" in caplog.text
    assert "No adapter found for" in caplog.text


def test_generate_streams_pieces_then_a_completion_with_vllm_usage(serve_config, versions, record):
    schema = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": {"type": "object"}}}

    async def scenario():
        async with running(VllmEngine(serve_config(), BASE, [versions["v1"]])) as engine:
            items = await collect(engine, chat("v1", seed=11, stop=("\n\n",), top_p=0.9))
            request = EngineRequest(
                model="v1",
                sampling=Sampling(max_tokens=9, temperature=0.7, seed=3, stop=("END",)),
                messages=[{"role": "user", "content": "a b c"}],
                response_format=schema,
            )
            await collect(engine, request)
            prompt = EngineRequest(model="tickets", sampling=Sampling(max_tokens=5), prompt="one two")
            completion_items = await collect(engine, prompt)
            return items, completion_items

    items, completion_items = asyncio.run(scenario())
    assert items == [
        "echo ", "v1", " max_tokens=7", Completion("echo v1 max_tokens=7", "stop", prompt_tokens=2, completion_tokens=3)
    ]  # fmt: skip
    assert completion_items[-1] == Completion("echo tickets max_tokens=5", "stop", prompt_tokens=2, completion_tokens=3)

    first, second = received(record, "/v1/chat/completions")
    assert first == {
        "messages": [{"role": "user", "content": "hello there"}],
        "model": "v1",
        "max_tokens": 7,
        "temperature": 0.0,  # unset means greedy, not vLLM's generation_config defaults
        "stream": True,
        "stream_options": {"include_usage": True},
        "top_p": 0.9,
        "stop": ["\n\n"],
        "seed": 11,
    }
    assert (second["max_tokens"], second["temperature"], second["seed"], second["stop"]) == (9, 0.7, 3, ["END"])
    assert second["response_format"] == schema
    assert received(record, "/v1/completions")[0]["prompt"] == "one two"


def test_vllm_refusing_a_request_is_an_invalid_request_and_unknown_models_never_reach_it(serve_config, record):
    async def scenario():
        async with running(VllmEngine(serve_config(), BASE, [])) as engine:
            with pytest.raises(UnknownModelError, match="'nope' does not exist; available models: tickets"):
                engine.generate(chat("nope"))
            assert received(record, "/v1/chat/completions") == []
            with pytest.raises(InvalidRequestError, match="max_tokens=5000 is more than the context") as refused:
                await collect(engine, chat("tickets", max_tokens=5000))
            assert refused.value.param == "max_tokens"

    asyncio.run(scenario())


def test_closing_a_generation_early_closes_the_stream_to_vllm(serve_config, record):
    def aborted() -> bool:
        return record.exists() and '"aborted"' in record.read_text()

    async def scenario():
        async with running(VllmEngine(serve_config(), BASE, [])) as engine:
            generation = engine.generate(chat("tickets", content="slow"))
            assert await anext(generation) == "."
            await generation.aclose()
            assert await asyncio.to_thread(wait_until, aborted)

    asyncio.run(scenario())


def test_close_ends_vllm_and_its_workers(serve_config, tmp_path):
    child_pid_file = tmp_path / "child.pid"

    async def scenario():
        engine = VllmEngine(serve_config("--child-pid-file", str(child_pid_file)), BASE, [])
        await engine.start()
        pid = engine._process.pid
        child = int(child_pid_file.read_text())
        assert alive(pid) and alive(child)
        await engine.close()
        return pid, child

    pid, child = asyncio.run(scenario())
    assert not alive(pid)
    assert wait_until(lambda: not alive(child))


def test_close_kills_a_vllm_that_ignores_sigterm(serve_config, monkeypatch):
    monkeypatch.setattr(vllm, "STOP_TIMEOUT", 0.5)

    async def scenario():
        engine = VllmEngine(serve_config("--ignore-sigterm"), BASE, [])
        await engine.start()
        process = engine._process
        await asyncio.wait_for(engine.close(), 10)
        return process

    process = asyncio.run(scenario())
    assert process.returncode == -9
    assert not alive(process.pid)


def test_a_vllm_that_exits_while_starting_is_reported_with_its_output(serve_config):
    engine = VllmEngine(serve_config("--exit-at-start"), BASE, [])
    with pytest.raises(TuneloopError, match=r"exited with code 3 while starting(.|\n)*standin refuses to start"):
        asyncio.run(engine.start())


def test_an_adapter_vllm_cannot_load_at_start_is_left_out_and_the_rest_served(serve_config, versions, caplog):
    async def scenario():
        async with running(VllmEngine(serve_config(), BASE, [versions["v1"], versions["missing"]])) as engine:
            return [m.name for m in engine.models()]

    with caplog.at_level(logging.WARNING, logger="tuneloop.serve"):
        assert asyncio.run(scenario()) == ["tickets", "v1"]
    assert any("refused to load missing" in r.getMessage() for r in caplog.records)


def test_a_vllm_that_never_answers_health_is_stopped(serve_config, tmp_path):
    child_pid_file = tmp_path / "child.pid"
    cfg = serve_config("--startup-delay", "60", "--child-pid-file", str(child_pid_file), startup_timeout=1.0)
    engine = VllmEngine(cfg, BASE, [])
    with pytest.raises(TuneloopError, match=r"did not answer /health within 1 s(.|\n)*standin: loading"):
        asyncio.run(engine.start())
    assert wait_until(lambda: not alive(int(child_pid_file.read_text())))


def test_a_port_already_in_use_is_refused_before_starting(serve_config):
    cfg = serve_config()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", cfg.vllm.port))
        taken.listen()
        with pytest.raises(TuneloopError, match=f"port {cfg.vllm.port} .* in use already"):
            asyncio.run(VllmEngine(cfg, BASE, []).start())


# --- real vLLM -----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_real_vllm_answers_a_chat_through_an_adapter(tiny_model_dir, tiny_adapter_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    cfg = ServeConfig(
        engine="vllm",
        vllm=VllmConfig(
            command=[sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"],
            port=free_port(),
            max_loras=2,
            max_lora_rank=8,
            startup_timeout=600,
            extra_args=["--max-model-len", "512", "--gpu-memory-utilization", "0.3", "--enforce-eager"],
        ),
    )
    base = ServedModel(name="tiny", path=tiny_model_dir)
    version = ServedModel(name="tiny-v1", path=tiny_adapter_dir, parent="tiny", kind="adapter")

    async def scenario():
        async with running(VllmEngine(cfg, base, [version])) as engine:
            assert [m.name for m in engine.models()] == ["tiny", "tiny-v1"]
            return await collect(engine, chat("tiny-v1", max_tokens=8, seed=0))

    *pieces, done = asyncio.run(scenario())
    assert isinstance(done, Completion)
    assert done.text == "".join(pieces)
    assert done.prompt_tokens > 0 and 0 < done.completion_tokens <= 8
    assert os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") is None  # set for vLLM only, not in this process
