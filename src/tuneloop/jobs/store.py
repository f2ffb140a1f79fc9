"""Files, fine-tuning jobs, their events and checkpoints, in SQLAlchemy tables: a SQLite file by default, or
PostgreSQL shared by the server and the workers of several machines. A job changes hands only through
conditional updates (the status it must have, the worker that holds it), so two processes never both
take, finish or recover the same job."""

from __future__ import annotations

import json
import secrets
import string
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from tuneloop.database import open_database

ACTIVE = ("validating_files", "queued", "running")  # statuses a job can still leave
IN_WORKER = ("validating_files", "running")  # statuses in which a worker may hold the job

metadata = MetaData()
files_table = Table(
    "ft_files", metadata,
    Column("id", String(40), primary_key=True),
    Column("project", String(128), nullable=False, index=True),
    Column("filename", String(512), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("content", LargeBinary, nullable=False),
)
jobs_table = Table(
    "ft_jobs", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # creation order, for listing
    Column("id", String(40), nullable=False, unique=True),
    Column("project", String(128), nullable=False, index=True),
    Column("created_at", Integer, nullable=False),
    Column("model", String(256), nullable=False),
    Column("training_file", String(40), nullable=False),
    Column("validation_file", String(40)),
    Column("suffix", String(64)),
    Column("seed", Integer, nullable=False),
    Column("metadata", Text),  # JSON
    Column("method", Text, nullable=False),  # JSON: {"type": ..., "<type>": {"hyperparameters": {...}}}
    Column("status", String(32), nullable=False, index=True),
    Column("error", Text),  # JSON: {code, message, param}
    Column("fine_tuned_model", String(512)),
    Column("finished_at", Integer),
    Column("trained_tokens", Integer),
    Column("result_files", Text, nullable=False, default="[]"),  # JSON list of file ids
    Column("worker", String(128)),  # who holds the job now: host:pid:thread
    Column("heartbeat", Float),  # when that worker last showed it is alive
    Column("attempts", Integer, nullable=False, default=0),  # times training started
    Column("losses", Integer, nullable=False, default=0),  # times the job's worker was lost
)
events_table = Table(
    "ft_events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("job_id", String(40), nullable=False, index=True),
    Column("created_at", Integer, nullable=False),
    Column("level", String(8), nullable=False),
    Column("message", Text, nullable=False),
    Column("type", String(16), nullable=False),
    Column("data", Text),  # JSON
)
checkpoints_table = Table(
    "ft_checkpoints", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("job_id", String(40), nullable=False, index=True),
    Column("step", Integer, nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("metrics", Text, nullable=False),  # JSON
    UniqueConstraint("job_id", "step"),
)


def new_id(prefix: str) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(24))


def store_url(database_url: str | None, jobs_dir: Path) -> str:
    """The SQLAlchemy URL of the job store: `api.database_url` (a bare postgresql:// URL gets psycopg 3),
    or SQLite in the jobs directory."""
    if database_url is None:
        jobs_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{jobs_dir / 'jobs.db'}"
    if database_url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + database_url.split("://", 1)[1]
    return database_url


class JobStore:
    def __init__(self, url: str):
        self.db = open_database(url, metadata, "job store", busy_timeout_ms=30_000)

    # files

    def add_file(self, project: str, filename: str, purpose: str, content: bytes) -> dict:
        row = {"id": new_id("file-"), "project": project, "filename": filename, "purpose": purpose,
               "bytes": len(content), "created_at": int(time.time()), "content": content}
        with self.db.begin() as conn:
            conn.execute(insert(files_table).values(**row))
        return {k: v for k, v in row.items() if k != "content"}

    def file(self, file_id: str, project: str, content: bool = False) -> dict | None:
        columns = [c for c in files_table.c if content or c.name != "content"]
        with self.db.connect() as conn:
            row = conn.execute(select(*columns).where(
                files_table.c.id == file_id, files_table.c.project == project)).mappings().first()
        return dict(row) if row else None

    def files(self, project: str, purpose: str | None = None) -> list[dict]:
        columns = [c for c in files_table.c if c.name != "content"]
        query = select(*columns).where(files_table.c.project == project)
        if purpose:
            query = query.where(files_table.c.purpose == purpose)
        with self.db.connect() as conn:
            return [dict(r) for r in conn.execute(query.order_by(files_table.c.created_at.desc())).mappings()]

    def delete_file(self, file_id: str, project: str) -> bool:
        with self.db.begin() as conn:
            return conn.execute(delete(files_table).where(
                files_table.c.id == file_id, files_table.c.project == project)).rowcount == 1

    # jobs

    def create_job(self, **fields: Any) -> dict:
        row = {"id": new_id("ftjob-"), "created_at": int(time.time()), "status": "validating_files",
               "result_files": "[]", "attempts": 0, "losses": 0, **fields}
        for key in ("metadata", "method"):
            row[key] = json.dumps(row[key]) if row.get(key) is not None else None
        with self.db.begin() as conn:
            conn.execute(insert(jobs_table).values(**row))
        return self.job(row["id"])

    def job(self, job_id: str, project: str | None = None) -> dict | None:
        query = select(jobs_table).where(jobs_table.c.id == job_id)
        if project is not None:
            query = query.where(jobs_table.c.project == project)
        with self.db.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _decoded(row) if row else None

    def jobs(self, project: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """A page of `project`'s jobs, newest first, after the job `after`; and whether more follow."""
        query = select(jobs_table).where(jobs_table.c.project == project)
        if after is not None:
            cursor = select(jobs_table.c.seq).where(jobs_table.c.id == after).scalar_subquery()
            query = query.where(jobs_table.c.seq < cursor)
        with self.db.connect() as conn:
            rows = conn.execute(query.order_by(jobs_table.c.seq.desc()).limit(limit + 1)).mappings().all()
        return [_decoded(r) for r in rows[:limit]], len(rows) > limit

    def update(self, job_id: str, expect: dict[str, Any] | None = None, **fields: Any) -> bool:
        """Set `fields` on the job where it still has the `expect`ed values (status may be a tuple of
        statuses); False when it no longer does."""
        for key in ("error", "result_files"):
            if key in fields and not isinstance(fields[key], str) and fields[key] is not None:
                fields[key] = json.dumps(fields[key])
        conditions = [jobs_table.c.id == job_id]
        for key, value in (expect or {}).items():
            column = jobs_table.c[key]
            conditions.append(column.in_(value) if isinstance(value, tuple) else
                              column.is_(None) if value is None else column == value)
        with self.db.begin() as conn:
            return conn.execute(update(jobs_table).where(and_(*conditions)).values(**fields)).rowcount == 1

    def claim(self, job_id: str, status: str, then: str, worker: str) -> bool:
        """Take the job for `worker` where it has `status` and no worker, moving it to `then`."""
        fields: dict[str, Any] = {"status": then, "worker": worker, "heartbeat": time.time()}
        if then == "running":
            current = self.job(job_id)
            if current is None:
                return False
            fields["attempts"] = current["attempts"] + 1
            return self.update(job_id, {"status": status, "worker": None, "attempts": current["attempts"]}, **fields)
        return self.update(job_id, {"status": status, "worker": None}, **fields)

    def beat(self, job_id: str, worker: str) -> bool:
        """Record that `worker` is alive and still holds the job; False when it no longer does."""
        return self.update(job_id, {"worker": worker, "status": IN_WORKER}, heartbeat=time.time())

    def lost(self, older_than: float) -> list[dict]:
        """Jobs held by a worker that showed no sign of life since `older_than` (Unix time)."""
        query = select(jobs_table).where(jobs_table.c.status.in_(IN_WORKER), jobs_table.c.worker.is_not(None),
                                         jobs_table.c.heartbeat < older_than)
        with self.db.connect() as conn:
            return [_decoded(r) for r in conn.execute(query).mappings()]

    # events and checkpoints

    def add_event(self, job_id: str, message: str, level: str = "info", kind: str = "message",
                  data: dict | None = None) -> None:
        with self.db.begin() as conn:
            conn.execute(insert(events_table).values(
                id=new_id("ftevent-"), job_id=job_id, created_at=int(time.time()), level=level, message=message,
                type=kind, data=json.dumps(data) if data is not None else None))

    def events(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return self._page(events_table, job_id, after, limit, "data")

    def add_checkpoint(self, job_id: str, step: int, metrics: dict) -> None:
        try:
            with self.db.begin() as conn:
                conn.execute(insert(checkpoints_table).values(
                    id=new_id("ftckpt-"), job_id=job_id, step=step, created_at=int(time.time()),
                    metrics=json.dumps(metrics)))
        except IntegrityError:  # a resumed run validates again at a step it had reached before
            pass

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return self._page(checkpoints_table, job_id, after, limit, "metrics")

    def _page(self, table: Table, job_id: str, after: str | None, limit: int, json_column: str):
        query = select(table).where(table.c.job_id == job_id)
        if after is not None:
            query = query.where(table.c.seq < select(table.c.seq).where(table.c.id == after).scalar_subquery())
        with self.db.connect() as conn:
            rows = conn.execute(query.order_by(table.c.seq.desc()).limit(limit + 1)).mappings().all()
        page = [{**r, json_column: json.loads(r[json_column]) if r[json_column] else None} for r in rows[:limit]]
        return page, len(rows) > limit


def _decoded(row) -> dict:
    job = dict(row)
    for key in ("metadata", "method", "error", "result_files"):
        job[key] = json.loads(job[key]) if job[key] else None
    job["result_files"] = job["result_files"] or []
    return job
