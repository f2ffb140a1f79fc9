"""The OpenAI fine-tuning jobs API: files, jobs, events and checkpoints on the same server (and API keys) as
inference, with the training in worker processes that take jobs from a persistent queue. A job runs the
loop (`pipeline.run`) and its fine-tune, once it passes the gate, is served as
`ft:<base>:<project>:<suffix>:<job id>`."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import yaml

from tuneloop.config import RunConfig
from tuneloop.jobs.api import jobs_router
from tuneloop.jobs.queue import job_queue
from tuneloop.jobs.store import JobStore, store_url
from tuneloop.jobs.worker import recover_lost, work
from tuneloop.serve.app import JobsApi

log = logging.getLogger("tuneloop.jobs")

__all__ = ["jobs_api", "work"]


def jobs_api(cfg: RunConfig, base_model: str) -> JobsApi:
    """The jobs API for `tuneloop serve`: its routes, and while the server is up `api.workers` worker
    processes (restarted when one dies) and the recovery of jobs whose worker was lost."""
    from tuneloop.registry import delete_served

    store = JobStore(store_url(cfg.api.database_url, cfg.jobs_dir))
    _, submit = job_queue(cfg.api.database_url, cfg.jobs_dir)

    @asynccontextmanager
    async def running():
        config_file = cfg.jobs_dir / "server-config.yaml"  # what the workers run under: this config, resolved
        config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        config_file.chmod(0o600)  # it may hold the database URL's password
        workers = [_start_worker(config_file) for _ in range(cfg.api.workers)]
        watching = asyncio.create_task(_watch(cfg, store, submit, workers, config_file))
        try:
            yield
        finally:
            watching.cancel()
            await asyncio.to_thread(_stop_workers, workers)

    return JobsApi(router=jobs_router(cfg, store, submit, base_model), running=running,
                   delete_model=lambda name: delete_served(cfg.registry, name), upload_path="/v1/files",
                   max_upload_bytes=cfg.api.max_file_bytes)


def _start_worker(config_file: Path) -> subprocess.Popen:
    env = {**os.environ, "TUNELOOP_PARENT": str(os.getpid())}
    return subprocess.Popen([sys.executable, "-m", "tuneloop", "worker", str(config_file)], env=env)


async def _watch(cfg: RunConfig, store: JobStore, submit, workers: list[subprocess.Popen], config_file: Path) -> None:
    """Restart a worker that died; queue again (or fail) the jobs of workers that were lost."""
    while True:
        await asyncio.sleep(max(1.0, min(5.0, cfg.api.heartbeat_timeout / 4)))
        for i, worker in enumerate(workers):
            if worker.poll() is not None:
                log.warning("job worker %d ended (exit code %s); starting another", worker.pid, worker.returncode)
                workers[i] = _start_worker(config_file)
        try:
            await asyncio.to_thread(recover_lost, cfg, store, submit)
        except Exception:  # noqa: BLE001 - a store that cannot be read now may be readable at the next look
            log.exception("could not look for lost jobs")


def _stop_workers(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()  # huey's consumer stops at once; a running phase dies with it and resumes later
    for worker in workers:
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
