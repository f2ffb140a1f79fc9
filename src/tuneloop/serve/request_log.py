"""The request log: one row per served request, and the feedback clients send about them.

SQLAlchemy underneath: a SQLite file by default, PostgreSQL by URL when several servers share one log.
Every request gets a row with its id, project, version, timing and token counts; the sampled share
(`monitor.sample_rate`) also keeps its prompt and answer, after the data stage's scanner has handled the
personal data in them. Rows are written by a background thread, so logging never delays an answer."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
)
from sqlalchemy.engine import Engine as Database
from sqlalchemy.exc import SQLAlchemyError

from tuneloop.data.pii import PiiScanner
from tuneloop.database import open_database
from tuneloop.data.split import in_share
from tuneloop.errors import TuneloopError
from tuneloop.serve.engine import Completion, InvalidRequestError, UnknownModelError

log = logging.getLogger("tuneloop.serve")
PiiAction = Literal["redact", "drop", "keep"]

metadata = MetaData()
requests_table = Table(
    "requests", metadata,
    Column("id", String(64), primary_key=True),
    Column("created", Float, nullable=False, index=True),  # Unix time the request arrived
    Column("project", String(128)),
    Column("model", String(256), nullable=False),  # the name the client asked for
    Column("version", String(256), nullable=False),  # what answered: `<model>-v<N>` or the base model
    Column("sampled", Boolean, nullable=False),  # False: prompt and answer were not kept
    Column("prompt", Text),  # JSON: the client's messages, or its prompt text
    Column("answer", Text),
    Column("pii_found", Integer, nullable=False, default=0),
    Column("status", Integer, nullable=False),  # HTTP-like: 200 answered, 499 client left, 500 failed
    Column("finish_reason", String(32)),
    Column("latency_ms", Float, nullable=False),
    Column("ttft_ms", Float),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
)
feedback_table = Table(
    "feedback", metadata,
    Column("id", String(64), primary_key=True),
    Column("completion_id", String(64), nullable=False, index=True),
    Column("project", String(128)),
    Column("created", Float, nullable=False),
    Column("rating", String(8), nullable=False),
    Column("correction", Text),
    Column("comment", Text),
    Column("pii_found", Integer, nullable=False, default=0),
)


class UnknownCompletionError(TuneloopError):
    """Feedback names a completion this log does not hold (for this project)."""


@dataclass
class RequestRecord:
    id: str
    created: float
    project: str | None
    model: str
    version: str
    prompt: list[dict[str, str]] | str | None
    answer: str | None = None
    status: int = 0
    finish_reason: str | None = None
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def connect(url: str) -> Database:
    """The log database at `url`, with its tables created (SQLite in WAL mode: the writer and the readers,
    `tuneloop monitor` and feedback, do not block each other). Prompts never reach error messages."""
    return open_database(url, metadata, "request log")


def is_sampled(request_id: str, rate: float) -> bool:
    """Whether the request's content is kept: a hash of its id below `rate`, so the choice is reproducible."""
    return in_share(request_id, rate)


class RequestLog:
    """Writes request rows on a background thread and answers feedback about them."""

    def __init__(self, url: str, sample_rate: float = 1.0, pii: PiiAction = "redact",
                 pii_patterns: dict[str, str] | None = None, retention_days: float = 30.0, max_pending: int = 10_000):
        self.database = connect(url)
        self.sample_rate, self.pii, self.retention_s = sample_rate, pii, retention_days * 86400
        self.scanner = PiiScanner(pii_patterns)
        self.pending: queue.Queue[RequestRecord | None] = queue.Queue(max_pending)
        self.dropped = 0  # rows that found the queue full: counted and reported, never silently lost
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_forever, name="request-log", daemon=True)
            self._thread.start()

    def record(self, row: RequestRecord) -> None:
        try:
            self.pending.put_nowait(row)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("request log: %d rows not written, the writer is behind", self.dropped)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every row recorded so far is written (at most `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while self.pending.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        if self._thread is not None:
            try:
                self.pending.put(None, timeout=30)
            except queue.Full:  # the writer is stuck: its rows are lost, and said so
                log.error("request log: %d rows not written at shutdown", self.pending.qsize())
            self._thread.join(timeout=30)
            self._thread = None
        self.database.dispose()

    def trace(self, generation: AsyncIterator, record: RequestRecord) -> AsyncIterator:
        """`generation` passed through, with its outcome recorded into `record` and logged once it ends."""
        return _traced(self, generation, record, time.perf_counter())

    def add_feedback(self, completion_id: str, project: str | None, rating: str, correction: str | None = None,
                     comment: str | None = None) -> dict[str, Any]:
        """Store a rating (and a corrected answer) for completion `completion_id` of `project`."""
        row = self._find(completion_id)
        with self.database.begin() as connection:
            if row is None or row.project != project:  # another project's ids are as unknown as made-up ones
                raise UnknownCompletionError(f"no completion with id {completion_id!r} in the request log")
            if not row.sampled:
                raise UnknownCompletionError(
                    f"completion {completion_id!r} was sampled out of the request log (monitor.sample_rate "
                    f"{self.sample_rate:g}): no prompt or answer was kept to attach feedback to"
                )
            texts, found = self._scrub([correction, comment])
            stored = {"id": f"fb-{uuid.uuid4().hex[:24]}", "completion_id": completion_id, "project": project,
                      "created": time.time(), "rating": rating, "correction": texts[0], "comment": texts[1],
                      "pii_found": found}
            connection.execute(insert(feedback_table), [stored])
        return stored

    def _find(self, completion_id: str):
        """The logged row of `completion_id`; a row still queued here, or written by another server a moment
        later, is waited for (at most about two seconds)."""
        query = select(requests_table.c.project, requests_table.c.sampled).where(requests_table.c.id == completion_id)
        deadline = time.monotonic() + 2.0
        while True:
            with self.database.connect() as connection:
                row = connection.execute(query).first()
            if row is not None or time.monotonic() > deadline:
                return row
            self.flush(timeout=max(0.0, deadline - time.monotonic()))
            time.sleep(0.05)

    def _write_forever(self) -> None:
        last_prune = 0.0
        while True:
            if time.time() - last_prune > 3600:
                last_prune = time.time()
                self._prune_logged()
            batch = [self.pending.get()]
            while len(batch) < 256:
                try:
                    batch.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            try:
                self._insert([self._stored(r) for r in batch if r is not None])
            except Exception:  # noqa: BLE001 - a failed write must not stop the log; the reason goes to the log
                log.exception("request log: %d rows could not be written", len(batch))
            finally:
                for _ in batch:
                    self.pending.task_done()
            if batch[-1] is None:
                return

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        """All rows in one transaction; when that fails, row by row, so one bad row loses only itself."""
        if not rows:
            return
        try:
            with self.database.begin() as connection:
                connection.execute(insert(requests_table), rows)
            return
        except SQLAlchemyError:
            pass
        for row in rows:
            try:
                with self.database.begin() as connection:
                    connection.execute(insert(requests_table), [row])
            except SQLAlchemyError as err:
                log.error("request log: row %s not written: %s", row["id"], type(err).__name__)

    def _prune_logged(self) -> None:
        try:
            deleted = self.prune()
        except Exception:  # noqa: BLE001 - retried at the next hour
            log.exception("request log: could not delete rows past retention")
            return
        if deleted:
            log.info("request log: deleted %d rows older than the retention period", deleted)

    def prune(self) -> int:
        """Delete rows older than the retention period, except those with feedback (training data)."""
        cutoff = time.time() - self.retention_s
        with self.database.begin() as connection:
            kept = select(feedback_table.c.completion_id)
            result = connection.execute(
                delete(requests_table).where(requests_table.c.created < cutoff, requests_table.c.id.not_in(kept))
            )
        return result.rowcount

    def _stored(self, record: RequestRecord) -> dict[str, Any]:
        stored = asdict(record)
        stored["sampled"] = is_sampled(record.id, self.sample_rate)
        stored["pii_found"] = 0
        if not stored["sampled"]:
            stored["prompt"] = stored["answer"] = None
            return stored
        prompt = record.prompt
        if isinstance(prompt, list):
            contents, prompt_found = self._scrub([m["content"] for m in prompt])
            prompt = [{**m, "content": text} for m, text in zip(prompt, contents)]
        else:
            (prompt,), prompt_found = self._scrub([prompt])
        (answer,), answer_found = self._scrub([record.answer])
        stored["pii_found"] = prompt_found + answer_found
        if self.pii == "drop" and stored["pii_found"]:
            prompt = answer = None
        stored["prompt"] = None if prompt is None else json.dumps(prompt, ensure_ascii=False)
        stored["answer"] = answer
        return stored

    def _scrub(self, texts: list[str | None]) -> tuple[list[str | None], int]:
        texts = [None if t is None else t.replace("\x00", "") for t in texts]  # PostgreSQL text holds no NUL
        if self.pii == "keep":
            return texts, 0
        scrubbed, found = [], 0
        for text in texts:
            if text is None:
                scrubbed.append(None)
                continue
            clean, hits = self.scanner.redact(text)
            found += sum(hits.values())
            scrubbed.append(None if hits and self.pii == "drop" else clean)
        return scrubbed, found


async def _traced(request_log: RequestLog, generation: AsyncIterator, record: RequestRecord, start: float):
    pieces: list[str] = []
    record.status = 499  # until the generation ends: the client went away
    try:
        async for event_ in generation:
            if isinstance(event_, Completion):
                record.status, record.finish_reason, record.answer = 200, event_.finish_reason, event_.text
                record.prompt_tokens, record.completion_tokens = event_.prompt_tokens, event_.completion_tokens
            else:
                if record.ttft_ms is None:
                    record.ttft_ms = (time.perf_counter() - start) * 1000
                pieces.append(event_)
            yield event_
    except (InvalidRequestError, UnknownModelError):
        record.status = 400
        raise
    except Exception:
        record.status = 500
        raise
    finally:
        await generation.aclose()
        if record.answer is None and pieces:
            record.answer = "".join(pieces)
        record.latency_ms = (time.perf_counter() - start) * 1000
        request_log.record(record)


def read_requests(database: Database, since: float, until: float | None = None) -> list[dict[str, Any]]:
    """Rows of requests that arrived in [since, until), oldest first, with prompts decoded."""
    query = select(requests_table).where(requests_table.c.created >= since).order_by(requests_table.c.created)
    if until is not None:
        query = query.where(requests_table.c.created < until)
    with database.connect() as connection:
        rows = [dict(row._mapping) for row in connection.execute(query)]
    for row in rows:
        row["prompt"] = None if row["prompt"] is None else json.loads(row["prompt"])
    return rows


def read_feedback(database: Database) -> list[dict[str, Any]]:
    """Every feedback row with the prompt, answer and version of the request it is about, oldest first."""
    query = (
        select(feedback_table, requests_table.c.prompt, requests_table.c.answer, requests_table.c.version)
        .join(requests_table, requests_table.c.id == feedback_table.c.completion_id)
        .order_by(feedback_table.c.created)
    )
    with database.connect() as connection:
        rows = [dict(row._mapping) for row in connection.execute(query)]
    for row in rows:
        row["prompt"] = None if row["prompt"] is None else json.loads(row["prompt"])
    return rows


__all__ = [
    "RequestLog",
    "RequestRecord",
    "UnknownCompletionError",
    "connect",
    "is_sampled",
    "read_feedback",
    "read_requests",
]
