"""The routes of OpenAI's files and fine-tuning jobs API. Each project (the API key's) sees only its own
files, jobs and models."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from tuneloop.config import RunConfig
from tuneloop.jobs.config import EXPLICIT, fine_tuned_name, resolved_method
from tuneloop.jobs.protocol import (
    CheckpointMetrics,
    FileDeleted,
    FileObject,
    FineTuningJob,
    JobCheckpoint,
    JobCreateRequest,
    JobError,
    JobEvent,
    JobHyperparameters,
    Page,
)
from tuneloop.jobs.queue import Execute
from tuneloop.jobs.store import ACTIVE, JobStore
from tuneloop.serve.engine import InvalidRequestError

PURPOSES = ("fine-tune", "fine-tune-results")


def jobs_router(cfg: RunConfig, store: JobStore, submit: Execute, base_model: str) -> APIRouter:
    router = APIRouter()
    short_name = Path(base_model).name  # a base model served from a directory is named by its path; jobs take either

    def owned_file(request: Request, file_id: str, content: bool = False) -> dict:
        found = store.file(file_id, request.state.project, content=content)
        if found is None:
            raise HTTPException(404, f"No such File object: {file_id}")
        return found

    def owned_job(request: Request, job_id: str) -> dict:
        job = store.job(job_id, request.state.project)
        if job is None:
            raise HTTPException(404, f"No such fine-tuning job: {job_id}")
        return job

    @router.post("/v1/files")
    async def upload(request: Request, file: UploadFile, purpose: str = Form()) -> FileObject:
        if purpose != "fine-tune":
            raise InvalidRequestError(f"purpose: only 'fine-tune' files are taken here, got {purpose!r}", "purpose")
        content = await file.read()
        if not content:
            raise InvalidRequestError("file: the file is empty", "file")
        stored = await asyncio.to_thread(store.add_file, request.state.project, file.filename or "upload.jsonl",
                                         purpose, content)
        return FileObject(**stored)

    @router.get("/v1/files")
    def list_files(request: Request, purpose: str | None = None, limit: int = 10000) -> Page:
        return Page(data=[FileObject(**f) for f in store.files(request.state.project, purpose)[:limit]])

    @router.get("/v1/files/{file_id}")
    def retrieve_file(request: Request, file_id: str) -> FileObject:
        return FileObject(**owned_file(request, file_id))

    @router.get("/v1/files/{file_id}/content")
    def file_content(request: Request, file_id: str) -> Response:
        return Response(owned_file(request, file_id, content=True)["content"], media_type="application/octet-stream")

    @router.delete("/v1/files/{file_id}")
    def delete_file(request: Request, file_id: str) -> FileDeleted:
        owned_file(request, file_id)
        return FileDeleted(id=file_id, deleted=store.delete_file(file_id, request.state.project))

    @router.post("/v1/fine_tuning/jobs")
    async def create_job(body: JobCreateRequest, request: Request) -> FineTuningJob:
        project = request.state.project
        if body.model not in (base_model, short_name):
            raise InvalidRequestError(
                f"model: {body.model!r} cannot be fine-tuned on this server; it fine-tunes {base_model!r}", "model"
            )
        for param in ("training_file", "validation_file"):
            file_id = getattr(body, param)
            if file_id is not None:
                found = store.file(file_id, project)
                if found is None or found["purpose"] != "fine-tune":
                    raise InvalidRequestError(f"{param}: no file {file_id!r} with purpose 'fine-tune'", param)
        try:
            method = resolved_method(cfg, body)
        except ValueError as err:
            raise InvalidRequestError(str(err), "method") from None
        seed = body.seed if body.seed is not None else random.randrange(2**31)
        job = await asyncio.to_thread(
            store.create_job, project=project, training_file=body.training_file,
            validation_file=body.validation_file, suffix=body.suffix, seed=seed, metadata=body.metadata, method=method,
            model=short_name,
        )
        store.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
        await asyncio.to_thread(submit, job["id"], "validate")
        return _job(job)

    @router.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, after: str | None = None, limit: int = 20) -> Page:
        jobs, more = store.jobs(request.state.project, after, max(1, min(limit, 100)))
        return Page(data=[_job(j) for j in jobs], has_more=more)

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(request: Request, job_id: str) -> FineTuningJob:
        job = owned_job(request, job_id)
        if job["status"] == "succeeded" and job["fine_tuned_model"] not in request.app.state.model_names():
            await request.app.state.refresh_models()  # callable as soon as the client sees the job succeed
        return _job(job)

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(request: Request, job_id: str) -> FineTuningJob:
        owned_job(request, job_id)
        if not store.update(job_id, {"status": ACTIVE}, status="cancelled", worker=None,
                            finished_at=int(time.time())):
            raise InvalidRequestError(f"job {job_id} has already {owned_job(request, job_id)['status']}", "job_id")
        store.add_event(job_id, "Job cancelled", level="warn")
        return _job(store.job(job_id))

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(request: Request, job_id: str, after: str | None = None, limit: int = 20) -> Page:
        owned_job(request, job_id)
        events, more = store.events(job_id, after, max(1, min(limit, 1000)))
        return Page(data=[JobEvent(id=e["id"], created_at=e["created_at"], level=e["level"], message=e["message"],
                                   data=e["data"], type=e["type"]) for e in events], has_more=more)

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(request: Request, job_id: str, after: str | None = None, limit: int = 10) -> Page:
        job = owned_job(request, job_id)
        rows, more = store.checkpoints(job_id, after, max(1, min(limit, 1000)))
        return Page(data=[
            JobCheckpoint(id=c["id"], created_at=c["created_at"], fine_tuning_job_id=job_id, step_number=c["step"],
                          fine_tuned_model_checkpoint=f"{fine_tuned_name(job)}:ckpt-step-{c['step']}",
                          metrics=CheckpointMetrics(**c["metrics"]))
            for c in rows
        ], has_more=more)

    return router


def _job(job: dict) -> FineTuningJob:
    kind = job["method"]["type"]
    values = job["method"][kind]["hyperparameters"]
    return FineTuningJob(
        id=job["id"], created_at=job["created_at"], error=JobError(**job["error"]) if job["error"] else None,
        fine_tuned_model=job["fine_tuned_model"], finished_at=job["finished_at"],
        hyperparameters=JobHyperparameters(**{k: values[k] for k in ("batch_size", "learning_rate_multiplier",
                                                                     "n_epochs")}),
        model=job["model"], organization_id=job["project"], result_files=job["result_files"], seed=job["seed"],
        status=job["status"], trained_tokens=job["trained_tokens"], training_file=job["training_file"],
        validation_file=job["validation_file"], integrations=[], metadata=job["metadata"],
        method={k: v for k, v in job["method"].items() if k != EXPLICIT},
    )
