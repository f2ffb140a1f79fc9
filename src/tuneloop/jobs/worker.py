"""Workers: processes that take job phases from the queue (huey's consumer) and run each in a process of
its own (`tuneloop.jobs.runner`), with a capped thread count and a lower scheduling priority so training
does not starve serving. While a phase runs its worker keeps the job's heartbeat; when the job is
cancelled (or taken back as lost) it stops the phase. A job whose worker died (no heartbeat for
`api.heartbeat_timeout`) or whose phase process was killed is queued again, and training resumes from
its newest checkpoint; after `api.max_attempts` starts it fails with the reason.

Run as `tuneloop worker CONFIG` on any machine that reaches the job store (for several machines:
`api.database_url` on PostgreSQL and a shared MLflow registry), or started by `tuneloop serve`."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from tuneloop.config import RunConfig
from tuneloop.jobs.queue import Execute, job_queue
from tuneloop.jobs.store import IN_WORKER, JobStore, store_url

log = logging.getLogger("tuneloop.jobs")


def work(cfg: RunConfig) -> None:
    """Take jobs from the queue until SIGTERM or SIGINT, `api.max_concurrent_jobs` at a time. Started by a
    server (TUNELOOP_PARENT names it), the worker dies with it."""
    die_with_parent()
    store = JobStore(store_url(cfg.api.database_url, cfg.jobs_dir))
    me = f"{socket.gethostname()}:{os.getpid()}"
    config_file = cfg.jobs_dir / f"worker-{os.getpid()}.yaml"  # the phases run under this config, resolved
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    config_file.chmod(0o600)  # it may hold the database URL's password
    submit: Execute

    def execute(job_id: str, phase: str) -> None:
        run_phase(cfg, config_file, store, submit, job_id, phase, f"{me}:{threading.get_ident()}")

    huey, submit = job_queue(cfg.api.database_url, cfg.jobs_dir, execute)
    threading.Thread(target=_recover_forever, args=(cfg, store, submit), daemon=True).start()
    consumer = huey.create_consumer(workers=cfg.api.max_concurrent_jobs, worker_type="thread", periodic=False,
                                    initial_delay=0.2, backoff=1.2, max_delay=1.0)
    log.info("worker %s taking jobs (%d at a time, %d threads each)", me, cfg.api.max_concurrent_jobs,
             worker_threads(cfg))
    consumer.run()


def worker_threads(cfg: RunConfig) -> int:
    return cfg.api.worker_threads or max(1, (os.cpu_count() or 2) // 2)


def run_phase(cfg: RunConfig, config_file: Path, store: JobStore, submit: Execute, job_id: str, phase: str,
              worker: str) -> None:
    """Run one phase of a job, if this worker can take it (not cancelled, not taken by another)."""
    status, then = ("validating_files", "validating_files") if phase == "validate" else ("queued", "running")
    if not store.claim(job_id, status, then, worker):
        return
    threads = str(worker_threads(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TUNELOOP_THREADS": threads,
           "TUNELOOP_PARENT": str(os.getpid())}
    command = [sys.executable, "-m", "tuneloop.jobs.runner", str(config_file), job_id, phase, worker]
    process = subprocess.Popen(command, env=env, preexec_fn=lambda: os.nice(5))  # noqa: PLW1509
    interval = min(5.0, cfg.api.heartbeat_timeout / 4)
    while True:
        try:
            code = process.wait(timeout=interval)
            break
        except subprocess.TimeoutExpired:
            if store.beat(job_id, worker):
                continue
            job = store.job(job_id)
            if job is None or job["status"] == "cancelled" or job["status"] in IN_WORKER:
                _stop(process)  # cancelled, or given up on as lost and taken by another worker
                return
            code = process.wait()  # the phase has said how it ended and is exiting
            break
    job = store.job(job_id)
    if job is None:
        return
    if phase == "validate" and job["status"] == "queued":
        submit(job_id, "train")
    elif job["status"] in IN_WORKER and job["worker"] == worker:  # the phase ended without saying how
        ended = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        requeue(cfg, store, submit, job, f"its {phase} process ended ({ended}) without finishing")


def requeue(cfg: RunConfig, store: JobStore, submit: Execute, job: dict, why: str) -> None:
    """Queue a job whose worker was lost again (training resumes from its newest checkpoint), or fail it
    once it has been started `api.max_attempts` times. Only one process wins when several try at once."""
    expect = {"status": job["status"], "worker": job["worker"], "heartbeat": job["heartbeat"]}
    validating = job["status"] == "validating_files"
    if job["losses"] + 1 >= cfg.api.max_attempts:
        message = f"the job's worker was lost {job['losses'] + 1} times; last: {why}"
        if store.update(job["id"], expect, status="failed", worker=None, finished_at=int(time.time()),
                        error={"code": "worker_lost", "message": message, "param": None}):
            store.add_event(job["id"], f"Job failed: {message}", level="error")
        return
    if store.update(job["id"], expect, status="validating_files" if validating else "queued", worker=None,
                    heartbeat=None, losses=job["losses"] + 1):
        store.add_event(job["id"], f"Worker lost: {why}. The job is queued again"
                        + ("" if validating else " and resumes from its newest checkpoint"), level="warn")
        submit(job["id"], "validate" if validating else "train")


def recover_lost(cfg: RunConfig, store: JobStore, submit: Execute) -> None:
    for job in store.lost(time.time() - cfg.api.heartbeat_timeout):
        requeue(cfg, store, submit, job,
                f"its worker {job['worker']} showed no sign of life for {cfg.api.heartbeat_timeout:g} s")


def _recover_forever(cfg: RunConfig, store: JobStore, submit: Execute) -> None:
    while True:
        try:
            recover_lost(cfg, store, submit)
        except Exception:  # noqa: BLE001 - a store that cannot be read now may be readable at the next look
            log.exception("could not look for lost jobs")
        time.sleep(max(1.0, cfg.api.heartbeat_timeout / 4))


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def die_with_parent() -> None:
    """Ask Linux to kill this process when the process that started it (`TUNELOOP_PARENT`) dies, so that a
    killed server or worker leaves nothing behind that nobody watches."""
    parent = int(os.environ.pop("TUNELOOP_PARENT", "0"))  # popped: not passed on to what this one starts
    if sys.platform != "linux" or not parent:
        return
    import ctypes

    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
