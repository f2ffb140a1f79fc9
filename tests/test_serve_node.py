"""The server through the official `openai` npm package (tests/node), where node and the package are installed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from openai import OpenAI

from tests.test_serve import ADAPTER, BASE, HELLO, LABEL_SCHEMA, PROMPTS, TRIAGE, answer, base_url, client, engine, triage_dir  # noqa: F401

NODE_DIR = Path(__file__).resolve().parent / "node"
pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_DIR / "node_modules" / "openai").is_dir(),
    reason="needs node and `npm install` in tests/node (make install does it where npm exists)",
)


def test_openai_npm_client(base_url, client: OpenAI):  # noqa: F811
    ran = subprocess.run(
        ["node", str(NODE_DIR / "client.mjs"), f"{base_url}/v1", BASE, ADAPTER, TRIAGE],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert ran.returncode == 0, ran.stderr
    got = json.loads(ran.stdout.strip().splitlines()[-1])
    assert got["models"][:3] == [[BASE, None], [ADAPTER, BASE], [TRIAGE, BASE]]
    assert got["streamed"] == got["completion"] == answer(client, ADAPTER, HELLO)
    assert got["stream_usage"] == got["usage"]
    assert got["text_completion"] == ["text_completion", "length", 4]
    # The version's system prompt was applied: as many prompt tokens as with it sent explicitly.
    explicit = client.chat.completions.create(model=TRIAGE, messages=PROMPTS[0], max_tokens=1)
    assert got["contract_prompt_tokens"] == explicit.usage.prompt_tokens
    finish, content = got["json_schema"]
    assert finish == "stop" and json.loads(content)["label"] in LABEL_SCHEMA["properties"]["label"]["enum"]
    alone = [answer(client, model, HELLO, max_tokens=6) for model in (BASE, ADAPTER, TRIAGE, BASE, ADAPTER)]
    assert got["mixed"] == alone
    assert got["unsupported"] == [400, "logprobs"]
