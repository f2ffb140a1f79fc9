"""HTTP routes: OpenAI-compatible chat completions, completions and model list, plus a health check."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tuneloop.config import ServeConfig
from tuneloop.errors import TuneloopError
from tuneloop.serve.contract import response_format, sampling_defaults, with_system_prompt
from tuneloop.serve.engine import Completion, Engine, EngineRequest, InvalidRequestError, Sampling, UnknownModelError
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
    ModelCard,
    ModelList,
    TextChoice,
    TextCompletion,
    Usage,
    unsupported,
)

log = logging.getLogger("tuneloop.serve")


def create_app(engine: Engine, cfg: ServeConfig | None = None) -> FastAPI:
    """The app serving `engine`'s models under `cfg` (defaults when None)."""
    cfg = cfg or ServeConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        yield
        await engine.close()

    app = FastAPI(title="tuneloop", lifespan=lifespan)
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        problem = err.errors()[0]
        param = ".".join(str(part) for part in problem["loc"] if part != "body")
        message = "unsupported parameter" if problem["type"] == "extra_forbidden" else problem["msg"]
        return _error(400, f"{param}: {message}" if param else message, param=param or None)

    @app.exception_handler(UnknownModelError)
    async def unknown_model(request: Request, err: UnknownModelError) -> JSONResponse:
        return _error(404, str(err), param="model", code="model_not_found")

    @app.exception_handler(InvalidRequestError)
    async def cannot_answer(request: Request, err: InvalidRequestError) -> JSONResponse:
        return _error(400, str(err), param=err.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        request_id = f"req_{uuid.uuid4().hex[:16]}"
        log.error("request %s failed", request_id, exc_info=err)
        return _error(500, f"internal error (request id {request_id})")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "models": [m.name for m in engine.models()]}

    @app.get("/v1/models")
    def list_models() -> ModelList:
        models = engine.models()
        root = models[0].name
        return ModelList(data=[ModelCard(id=m.name, created=started, root=root, parent=m.parent) for m in models])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> ChatCompletion | StreamingResponse:
        served = _served(engine, _checked(body).model)
        messages = with_system_prompt([m.as_chat() for m in body.messages], served)
        requested = body.response_format
        answer_format = response_format(requested.as_dict() if requested else None, served, cfg)
        max_tokens = body.max_completion_tokens or body.max_tokens
        generation = engine.generate(
            EngineRequest(body.model, _sampling(cfg, body, max_tokens), messages=messages, response_format=answer_format)
        )
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
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
    async def completions(body: CompletionRequest) -> TextCompletion | StreamingResponse:
        _served(engine, _checked(body).model)
        generation = engine.generate(
            EngineRequest(body.model, _sampling(cfg, body, body.max_tokens), prompt=body.prompt_text)
        )
        head = TextCompletion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, choices=[])
        if body.stream:
            return _event_stream(_text_chunks(await _started(generation), head, body.include_usage))
        text, done = await _collect(generation)
        choice = TextChoice(text=text, finish_reason=done.finish_reason)
        return head.model_copy(update={"choices": [choice], "usage": _usage(done)})

    return app


def _served(engine: Engine, name: str):
    models = {m.name: m for m in engine.models()}
    if name not in models:
        raise UnknownModelError(name, list(models))
    return models[name]


def _checked(body):
    param = unsupported(body)
    if param is not None:
        raise InvalidRequestError(f"{param}: only its default value is supported", param=param)
    return body


def _sampling(cfg: ServeConfig, body, max_tokens: int | None) -> Sampling:
    defaults = sampling_defaults(cfg, body.model)
    return Sampling(
        max_tokens=max_tokens or defaults.max_tokens or cfg.max_new_tokens,
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
