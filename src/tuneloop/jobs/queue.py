"""The job queue: huey, on a SQLite file beside the job store by default, or on PostgreSQL (huey's own
storage, `FOR UPDATE SKIP LOCKED`), through which workers on several machines take jobs. A queued task
names a job and the phase to run; everything else about the job is in the job store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from huey import Huey, PostgresHuey, SqliteHuey

from tuneloop.errors import TuneloopError

TASK = "tuneloop.job_phase"
Phase = str  # "validate" or "train"
Execute = Callable[[str, Phase], None]


def job_queue(database_url: str | None, jobs_dir: Path, execute: Execute | None = None) -> tuple[Huey, Execute]:
    """The queue, and the function that puts (job id, phase) on it. A worker passes `execute`, which runs
    each task it takes; the server passes none (it only submits)."""
    if database_url is None:
        jobs_dir.mkdir(parents=True, exist_ok=True)
        huey: Huey = SqliteHuey("tuneloop-jobs", filename=str(jobs_dir / "queue.db"), results=False, utc=True)
    elif database_url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        dsn = "postgresql://" + database_url.split("://", 1)[1]
        try:
            huey = PostgresHuey("tuneloop-jobs", dsn=dsn, results=False, utc=True, read_timeout=1)
        except Exception as err:  # psycopg raises several kinds of connection errors
            raise TuneloopError(f"job queue: cannot open {database_url.split('@')[-1]} ({err})") from None
    else:
        raise TuneloopError(f"api.database_url: {database_url.split('@')[-1]}: expected a postgresql:// URL")

    # Defined here in every process, so the task's name (module and name) is the same for the submitting
    # server and the executing worker.
    def run_phase(job_id: str, phase: Phase) -> None:
        if execute is None:
            raise RuntimeError("this process only submits jobs")
        execute(job_id, phase)

    return huey, huey.task(name=TASK)(run_phase)
