"""Serving: the base model and its registered versions, each by name, behind an OpenAI-compatible API."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import ServeConfig
from tuneloop.serve.app import JobsApi
from tuneloop.serve.request_log import RequestLog


def serve(
    cfg: ServeConfig,
    base: BaseModelRef,
    registered: Callable[[], dict[str, Path]],
    api_keys: dict[str, str] | None = None,
    request_log: RequestLog | None = None,
    jobs: JobsApi | None = None,
) -> None:
    """Serve `base` and the versions `registered()` names (served name -> directory), following it as it
    changes, until interrupted; with `api_keys` (key -> project) only to clients that send one, and with
    `request_log` logging every request there, and with `jobs` the fine-tuning jobs API too. SIGTERM stops taking requests and lets the running ones
    finish, for at most `serve.shutdown_timeout` seconds."""
    import gc
    import logging

    import uvicorn

    from tuneloop.serve.app import create_app
    from tuneloop.serve.contract import served_models

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    engine = build_engine(cfg, base, registered())
    app = create_app(engine, cfg, api_keys, versions=lambda: served_models(base, registered())[1],
                     request_log=request_log, jobs=jobs)
    # The weights and libraries loaded so far live as long as the server: kept out of the garbage collector's
    # full passes, which otherwise stop every thread (the event loop too) for hundreds of ms under load.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=cfg.shutdown_timeout)


def build_engine(cfg: ServeConfig, base: BaseModelRef, versions: dict[str, Path]):
    """The engine `serve.engine` names, loaded with the base model and the versions."""
    from tuneloop.serve.contract import served_models

    base_model, served = served_models(base, versions)
    if cfg.engine == "vllm":
        from tuneloop.serve.vllm import VllmEngine

        return VllmEngine(cfg, base_model, served)
    from tuneloop.serve.batching import BatchingEngine

    return BatchingEngine(cfg, base_model, served, trust_remote_code=base.trust_remote_code)
