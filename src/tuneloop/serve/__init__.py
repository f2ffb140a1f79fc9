"""Serving: one base model and its LoRA adapters, each by name, behind an OpenAI-compatible API."""

from __future__ import annotations

from pathlib import Path

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import ServeConfig


def serve(cfg: ServeConfig, base: BaseModelRef, adapters: dict[str, Path]) -> None:
    """Serve `base` and every adapter in `adapters` (name -> adapter directory) until interrupted."""
    import uvicorn

    from tuneloop.serve.app import create_app
    from tuneloop.serve.engine import Engine

    app = create_app(Engine(base, adapters), default_max_tokens=cfg.max_new_tokens)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
