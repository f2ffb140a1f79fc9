"""HTTP routes: OpenAI-compatible chat completions, completions and model list, plus a health check."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from tuneloop.config import ServeConfig
from tuneloop.errors import TuneloopError
from tuneloop.serve.contract import owner, response_format, sampling_defaults, with_system_prompt
from tuneloop.serve.engine import (
    Completion,
    Engine,
    EngineRequest,
    InvalidRequestError,
    Sampling,
    ServedModel,
    UnknownModelError,
)
from tuneloop.serve.metrics import ServingMetrics
from tuneloop.serve.request_log import RequestLog, RequestRecord, UnknownCompletionError
from tuneloop.serve.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionRequest,
    Delta,
    ErrorDetail,
    ErrorResponse,
    Feedback,
    FeedbackRequest,
    ModelCard,
    ModelDeleted,
    ModelList,
    TextChoice,
    TextCompletion,
    Usage,
    unsupported,
)

log = logging.getLogger("tuneloop.serve")


class Unauthorized(Exception):
    pass


class Overloaded(Exception):
    pass


NO_KEY_PROJECT = "default"  # the project of every client when the server takes no API keys


@dataclass(frozen=True)
class JobsApi:
    """What the fine-tuning jobs API hands the server: its routes (behind the same API keys), what runs
    beside the server while it is up (the workers, the recovery of lost jobs), how to delete a fine-tuned
    model from the registry, and the largest upload its routes take."""

    router: APIRouter
    running: Callable[[], AbstractAsyncContextManager]
    delete_model: Callable[[str], bool]
    upload_path: str
    max_upload_bytes: int


def create_app(
    engine: Engine,
    cfg: ServeConfig | None = None,
    api_keys: dict[str, str] | None = None,
    versions: Callable[[], list[ServedModel]] | None = None,
    request_log: RequestLog | None = None,
    jobs: JobsApi | None = None,
) -> FastAPI:
    """The app serving `engine`'s models under `cfg` (defaults when None). With `api_keys` (key -> project)
    every /v1 route needs `Authorization: Bearer <key>`; the key's project is `request.state.project`.
    With `versions`, what the registry serves now, the engine follows it every `serve.reload_interval`.
    With `request_log`, every request is logged there and `/v1/feedback` stores ratings beside it. With
    `jobs`, the fine-tuning jobs API is served too. A fine-tuning job's model is visible to its project only."""
    cfg = cfg or ServeConfig()
    metrics = ServingMetrics()
    in_flight = [0]  # requests accepted and not yet over, all models
    follower = RegistryFollower(engine, versions)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if request_log is not None:
            request_log.start()
        await engine.start()
        following = None
        if versions is not None and cfg.reload_interval > 0:
            following = asyncio.create_task(follower.follow(cfg.reload_interval))
        async with jobs.running() if jobs is not None else _nothing():
            yield
        if following is not None:
            following.cancel()
        await engine.close()
        if request_log is not None:
            await asyncio.to_thread(request_log.close)

    app = FastAPI(title="tuneloop", lifespan=lifespan)
    uploads = {jobs.upload_path: jobs.max_upload_bytes} if jobs is not None else {}
    app.add_middleware(BodyLimit, max_bytes=cfg.max_request_bytes, larger=uploads)
    app.state.refresh_models = follower.refresh
    app.state.model_names = lambda: {m.name for m in engine.models()}
    started = int(time.time())

    async def project(request: Request) -> str | None:
        if api_keys is None:
            request.state.project = NO_KEY_PROJECT
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in api_keys:
            raise Unauthorized()
        request.state.project = api_keys[key.strip()]
        return request.state.project

    def served_to(request: Request, name: str) -> ServedModel:
        """The model `name` as this request's project may use it: another project's fine-tune is unknown."""
        visible = [m for m in engine.models() if owner(m.name) in (None, request.state.project)]
        models = {m.name: m for m in visible}
        if name not in models:
            raise UnknownModelError(name, list(models))
        return models[name]

    def admit(served: ServedModel, generation, reply_id: str, client: str | None, prompt) -> AsyncIterator:
        in_flight[0] += 1

        def over() -> None:
            in_flight[0] -= 1

        tracked = metrics.track(served.name, generation, on_end=over)
        if request_log is None:
            return tracked
        record = RequestRecord(id=reply_id, created=time.time(), project=client, model=served.name,
                               version=_version_name(engine, served), prompt=prompt)
        return request_log.trace(tracked, record)

    def check_capacity() -> None:
        if in_flight[0] >= cfg.max_batch_size + cfg.max_queue:
            raise Overloaded()

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, err: Unauthorized) -> JSONResponse:
        metrics.rejected.labels("401").inc()
        return _error(401, "Incorrect API key provided; send it as `Authorization: Bearer <key>`.",
                      code="invalid_api_key")

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, err: Overloaded) -> JSONResponse:
        metrics.rejected.labels("429").inc()
        response = _error(429, f"the server is at capacity ({cfg.max_batch_size} running, {cfg.max_queue} waiting); "
                          "retry later", code="rate_limit_exceeded")
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        problem = err.errors()[0]
        param = ".".join(str(part) for part in problem["loc"] if part != "body")
        message = "unsupported parameter" if problem["type"] == "extra_forbidden" else problem["msg"]
        metrics.rejected.labels("400").inc()
        return _error(400, f"{param}: {message}" if param else message, param=param or None)

    @app.exception_handler(UnknownModelError)
    async def unknown_model(request: Request, err: UnknownModelError) -> JSONResponse:
        metrics.rejected.labels("404").inc()
        return _error(404, str(err), param="model", code="model_not_found")

    @app.exception_handler(UnknownCompletionError)
    async def unknown_completion(request: Request, err: UnknownCompletionError) -> JSONResponse:
        return _error(404, str(err), param="completion_id", code="completion_not_found")

    @app.exception_handler(InvalidRequestError)
    async def cannot_answer(request: Request, err: InvalidRequestError) -> JSONResponse:
        metrics.rejected.labels("400").inc()
        return _error(400, str(err), param=err.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        request_id = f"req_{uuid.uuid4().hex[:16]}"
        log.error("request %s failed", request_id, exc_info=err)
        metrics.rejected.labels("500").inc()
        return _error(500, f"internal error (request id {request_id})")

    @app.get("/health")
    async def health() -> dict:  # on the event loop itself: no thread hop, so it answers under load
        return {"status": "ok", "models": [m.name for m in engine.models()]}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(project)])
    def list_models(request: Request) -> ModelList:
        models = engine.models()
        root = models[0].name
        visible = [m for m in models if owner(m.name) in (None, request.state.project)]
        return ModelList(data=[ModelCard(id=m.name, created=started, root=root, parent=m.parent) for m in visible])

    @app.delete("/v1/models/{model:path}", dependencies=[Depends(project)])
    async def delete_model(model: str, request: Request) -> ModelDeleted:
        """Delete a fine-tuning job's model (of the caller's project) from the registry and from serving."""
        if owner(model) != request.state.project or jobs is None:
            raise UnknownModelError(model, [m.name for m in engine.models() if owner(m.name) == request.state.project])
        deleted = await asyncio.to_thread(jobs.delete_model, model)
        if not deleted:
            raise UnknownModelError(model, [])
        await follower.refresh()
        return ModelDeleted(id=model, deleted=True)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, client: str | None = Depends(project)
    ) -> ChatCompletion | StreamingResponse:
        served = served_to(request, _checked(body).model)
        sent = [m.as_chat() for m in body.messages]
        messages = with_system_prompt(sent, served)
        requested = body.response_format
        answer_format = response_format(requested.as_dict() if requested else None, served, cfg)
        max_tokens = body.max_completion_tokens or body.max_tokens
        sampling = _sampling(cfg, body, max_tokens, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        check_capacity()
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        generation = admit(served, engine.generate(
            EngineRequest(body.model, sampling, messages=messages, response_format=answer_format)
        ), reply_id, client, sent)
        if body.stream:
            head = ChatCompletionChunk(id=reply_id, created=created, model=body.model, choices=[])
            return _event_stream(_chat_chunks(await _started(generation), head, body.include_usage))
        text, done = await _collect(generation)
        message = AssistantMessage(content=text)
        return ChatCompletion(
            id=reply_id, created=created, model=body.model,
            choices=[Choice(message=message, finish_reason=done.finish_reason)], usage=_usage(done),
        )

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request, client: str | None = Depends(project)
    ) -> TextCompletion | StreamingResponse:
        served = served_to(request, _checked(body).model)
        sampling = _sampling(cfg, body, body.max_tokens, "max_tokens")
        check_capacity()
        head = TextCompletion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, choices=[])
        generation = admit(served, engine.generate(EngineRequest(body.model, sampling, prompt=body.prompt_text)),
                           head.id, client, body.prompt_text)
        if body.stream:
            return _event_stream(_text_chunks(await _started(generation), head, body.include_usage))
        text, done = await _collect(generation)
        choice = TextChoice(text=text, finish_reason=done.finish_reason)
        return head.model_copy(update={"choices": [choice], "usage": _usage(done)})

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, client: str | None = Depends(project)) -> Feedback:
        if request_log is None:
            raise UnknownCompletionError("this server keeps no request log, so it takes no feedback")
        stored = await asyncio.to_thread(request_log.add_feedback, body.completion_id, client, body.rating,
                                         body.correction, body.comment)
        return Feedback(**{k: v for k, v in stored.items() if k not in ("project", "pii_found")})

    if jobs is not None:
        app.include_router(jobs.router, dependencies=[Depends(project)])
    return app


@asynccontextmanager
async def _nothing():
    yield


class BodyLimit:
    """Answers 413 to a request whose body is larger than `max_bytes` (or, under a path of `larger`, that
    path's limit), by its Content-Length or, when the body is chunked, as soon as it has read that much."""

    def __init__(self, app, max_bytes: int, larger: dict[str, int] | None = None):
        self.app, self.default_max, self.larger = app, max_bytes, larger or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = next((n for path, n in self.larger.items() if scope["path"].startswith(path)), self.default_max)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, limit)
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit and not refused:
                refused = True
                await self._refuse(send, limit)
                return {"type": "http.disconnect"}  # the app stops reading; what it answers is dropped
            return message

        async def unless_refused(message):
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)

    async def _refuse(self, send, limit: int) -> None:
        setting = "serve.max_request_bytes" if limit == self.default_max else "api.max_file_bytes"
        response = _error(413, f"the request body is larger than {limit} bytes ({setting})")
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


class RegistryFollower:
    """Keeps the engine in step with the registry: new versions and alias moves reach traffic within the
    reload interval, without a restart, or at once where a route asks (a fine-tuning job that just ended,
    a deleted model)."""

    def __init__(self, engine: Engine, versions: Callable[[], list[ServedModel]] | None):
        self.engine, self.versions = engine, versions
        self.lock = asyncio.Lock()
        self.served: list | None = None

    async def refresh(self) -> None:
        if self.versions is None:
            return
        async with self.lock:
            if self.served is None:
                self.served = [(m.name, m.path) for m in self.engine.models()[1:]]
            wanted = await asyncio.to_thread(self.versions)
            if [(m.name, m.path) for m in wanted] == self.served:
                return
            now = await self.engine.sync(wanted)
            log.info("serving %s", ", ".join(m.name for m in now) or "the base model only")
            self.served = [(m.name, m.path) for m in wanted]

    async def follow(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a registry that cannot be read now may be readable at the next look
                log.exception("could not follow the registry; still serving the versions loaded before")


def _version_name(engine: Engine, served: ServedModel) -> str:
    """The numbered name of the version a bare model name serves now (`<model>-v<N>`), else the name itself."""
    if served.kind == "base":
        return served.name
    numbered = re.compile(rf"{re.escape(served.name)}-v\d+")
    return next((m.name for m in engine.models() if m.path == served.path and numbered.fullmatch(m.name)), served.name)


def _checked(body):
    param = unsupported(body)
    if param is not None:
        raise InvalidRequestError(f"{param}: only its default value is supported", param=param)
    return body


def _sampling(cfg: ServeConfig, body, max_tokens: int | None, param: str) -> Sampling:
    if max_tokens is not None and max_tokens > cfg.max_tokens_cap:
        raise InvalidRequestError(f"{param}: at most {cfg.max_tokens_cap} (serve.max_tokens_cap)", param=param)
    defaults = sampling_defaults(cfg, body.model)
    return Sampling(
        max_tokens=max_tokens or min(defaults.max_tokens or cfg.max_new_tokens, cfg.max_tokens_cap),
        fit_to_context=max_tokens is None,
        temperature=body.temperature if body.temperature is not None else defaults.temperature,
        top_p=body.top_p if body.top_p is not None else defaults.top_p,
        stop=body.stop_strings,
        seed=body.seed,
    )


async def _collect(generation) -> tuple[str, Completion]:
    try:
        async for event in generation:
            if isinstance(event, Completion):
                return event.text, event
    finally:
        await generation.aclose()
    raise TuneloopError("the engine ended without a completion")


async def _started(generation) -> AsyncIterator[str | Completion]:
    """`generation` once its first event is in: an engine that refuses the request does so before the
    stream's 200 is sent, so the client gets a proper error status."""
    try:
        first = await anext(generation)
    except BaseException:
        await generation.aclose()
        raise

    async def chained():
        try:
            yield first
            async for event in generation:
                yield event
        finally:
            await generation.aclose()

    return chained()


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream")


async def _chat_chunks(generation, head: ChatCompletionChunk, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return _sse(head.model_copy(update={"choices": choices, "usage": usage}))

    async for line in _stream(generation, chunk([ChunkChoice(delta=Delta(role="assistant"))]),
                              lambda text: chunk([ChunkChoice(delta=Delta(content=text))]),
                              lambda done: chunk([ChunkChoice(delta=Delta(), finish_reason=done.finish_reason)]),
                              (lambda done: chunk([], usage=_usage(done))) if include_usage else None):
        yield line


async def _text_chunks(generation, head: TextCompletion, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[TextChoice], usage: Usage | None = None) -> str:
        return _sse(head.model_copy(update={"choices": choices, "usage": usage}))

    async for line in _stream(generation, None,
                              lambda text: chunk([TextChoice(text=text)]),
                              lambda done: chunk([TextChoice(text="", finish_reason=done.finish_reason)]),
                              (lambda done: chunk([], usage=_usage(done))) if include_usage else None):
        yield line


async def _stream(
    generation,
    first: str | None,
    piece: Callable[[str], str],
    last: Callable[[Completion], str],
    usage: Callable[[Completion], str] | None,
) -> AsyncIterator[str]:
    try:
        if first is not None:
            yield first
        async for event in generation:
            if isinstance(event, Completion):
                yield last(event)
                if usage is not None:
                    yield usage(event)
            else:
                yield piece(event)
        yield "data: [DONE]\n\n"
    except Exception:  # noqa: BLE001 - the status line is sent already: end the stream with an error event
        request_id = f"req_{uuid.uuid4().hex[:16]}"
        log.exception("stream %s failed", request_id)
        error = ErrorDetail(message=f"internal error (request id {request_id})", type="server_error")
        yield f"data: {ErrorResponse(error=error).model_dump_json()}\n\n"
    finally:
        # A client that goes away cancels this task: the engine frees the request's slot at its next step.
        await generation.aclose()


def _sse(payload) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _usage(done: Completion) -> Usage:
    total = done.prompt_tokens + done.completion_tokens
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens, total_tokens=total)


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)
