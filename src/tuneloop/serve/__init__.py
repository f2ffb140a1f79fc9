"""Serving: the base model and its registered versions, each by name, behind an OpenAI-compatible API."""

from __future__ import annotations

from pathlib import Path

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import ServeConfig


def serve(cfg: ServeConfig, base: BaseModelRef, versions: dict[str, Path]) -> None:
    """Serve `base` and every registered version in `versions` (served name -> directory) until interrupted."""
    import logging

    import uvicorn

    from tuneloop.serve.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(create_app(build_engine(cfg, base, versions), cfg), host=cfg.host, port=cfg.port, log_level="info")


def build_engine(cfg: ServeConfig, base: BaseModelRef, versions: dict[str, Path]):
    """The engine `serve.engine` names, loaded with the base model and the versions."""
    from tuneloop.serve.contract import served_models

    base_model, served = served_models(base, versions)
    if cfg.engine == "vllm":
        from tuneloop.serve.vllm import VllmEngine

        return VllmEngine(cfg, base_model, served)
    from tuneloop.serve.batching import BatchingEngine

    return BatchingEngine(cfg, base_model, served, trust_remote_code=base.trust_remote_code)
