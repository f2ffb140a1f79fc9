"""Promotion and rollback reach live traffic: a running server follows the `production` alias that
`tuneloop registry promote|rollback` moves, streams finish on the version they started on, and a broken
version promoted with --force leaves the server on the version it had."""

from __future__ import annotations

import logging
import shutil
import time

import pytest
from openai import OpenAI

from tests.test_registry_promotion import project  # noqa: F401  (the registered-run fixture)
from tuneloop.artifacts import BaseModelRef
from tuneloop.config import ServeConfig
from tuneloop.registry import adapter_paths
from tuneloop.serve import build_engine
from tuneloop.serve.app import create_app
from tuneloop.serve.contract import served_models

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def second_adapter(tiny_model_dir, tmp_path):
    """Another adapter with weights of its own, so its answers differ from the first one's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    model.save_pretrained(tmp_path / "second-adapter")
    return tmp_path / "second-adapter"


def test_promote_and_rollback_reach_a_running_server(project, tiny_model_dir, tiny_adapter_dir, second_adapter,  # noqa: F811
                                                     tmp_path, serve_app, caplog):
    cli, register, cfg = project
    register(tiny_adapter_dir)
    register(second_adapter)
    assert cli("registry", "promote", "config.yaml", "1").exit_code == 0
    base = BaseModelRef(str(tiny_model_dir), tiny_model_dir)
    serve_cfg = ServeConfig(reload_interval=0.5)
    engine = build_engine(serve_cfg, base, adapter_paths(cfg.registry, base.name))
    app = create_app(engine, serve_cfg, versions=lambda: served_models(base, adapter_paths(cfg.registry, base.name))[1])
    client = OpenAI(base_url=serve_app(app), api_key="unused", max_retries=0)

    def answer(model: str) -> str:
        return client.chat.completions.create(model=model, messages=HELLO, max_tokens=20, temperature=0
                                              ).choices[0].message.content

    def served_by(version: str):
        deadline = time.monotonic() + 10
        while answer("triage") != answer(version):
            assert time.monotonic() < deadline, f"the bare name did not move to {version} within 10 s"
            time.sleep(0.2)

    v1, v2 = answer("triage-v1"), answer("triage-v2")
    assert v1 != v2 and answer("triage") == v1
    v1_key = engine._routes["triage-v1"][2]

    # A long answer under way on v1 when v2 is promoted keeps running on v1.
    stream = client.chat.completions.create(model="triage", messages=HELLO, max_tokens=1500, temperature=0, stream=True)
    next(stream)
    assert cli("registry", "promote", "config.yaml", "2").exit_code == 0
    served_by("triage-v2")  # promoted: the next requests are answered by v2
    [running] = [item for item in engine._weights["base"].running if len(item.generated) > 20]
    assert running.adapter == v1_key and not running.done
    stream.close()

    assert cli("registry", "rollback", "config.yaml").exit_code == 0
    served_by("triage-v1")

    broken = tmp_path / "broken-adapter"
    shutil.copytree(tiny_adapter_dir, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    register(broken)
    refused = cli("registry", "promote", "config.yaml", "3")
    assert refused.exit_code == 1 and "does not load" in refused.output
    with caplog.at_level(logging.ERROR, logger="tuneloop.serve"):
        assert cli("registry", "promote", "config.yaml", "3", "--force").exit_code == 0
        deadline = time.monotonic() + 10
        while not any("triage" in r.getMessage() and "not loaded" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the server did not try the forced version"
            time.sleep(0.2)
    assert answer("triage") == v1  # the server kept the version it had
    assert "triage-v3" not in [m.id for m in client.models.list().data]
