"""HTTP routes: OpenAI-compatible chat completions and model list, plus a health check."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException

from tuneloop.serve.engine import Completion, Engine, Generation, Sampling, UnknownModelError
from tuneloop.serve.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)


def create_app(engine: Engine, default_max_tokens: int = 256) -> FastAPI:
    """The app serving `engine`'s models; `default_max_tokens` applies to requests that set no limit."""
    app = FastAPI(title="tuneloop")
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        problem = err.errors()[0]
        param = ".".join(str(part) for part in problem["loc"] if part != "body")
        return _error(400, f"{param}: {problem['msg']}" if param else problem["msg"], param=param or None)

    @app.exception_handler(UnknownModelError)
    async def unknown_model(request: Request, err: UnknownModelError) -> JSONResponse:
        return _error(404, str(err), param="model", code="model_not_found")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(err).__name__}: {err}")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "models": engine.model_names}

    @app.get("/v1/models")
    def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=started) for name in engine.model_names])

    # A plain `def`: FastAPI runs it in its threadpool, so generation never blocks the event loop.
    @app.post("/v1/chat/completions", response_model=None)
    def chat_completions(body: ChatCompletionRequest) -> ChatCompletion | StreamingResponse:
        messages = [{"role": message.role, "content": message.text} for message in body.messages]
        sampling = Sampling(
            max_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_strings,
            seed=body.seed,
        )
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            events = engine.stream(body.model, messages, sampling)  # an unknown model raises here, before streaming
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            head = ChatCompletionChunk(id=reply_id, created=created, model=body.model, choices=[])
            return StreamingResponse(_stream(events, head, include_usage), media_type="text/event-stream")
        done = engine.complete(body.model, messages, sampling)
        return ChatCompletion(
            id=reply_id,
            created=created,
            model=body.model,
            choices=[Choice(message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)],
            usage=_usage(done),
        )

    return app


async def _stream(events: Generation, head: ChatCompletionChunk, include_usage: bool) -> AsyncIterator[str]:
    try:
        async for chunk in iterate_in_threadpool(_sse(events, head, include_usage)):
            yield chunk
    finally:
        # A client that goes away cancels this task: stop its generation now, not whenever the GC collects it.
        events.close()


def _sse(events: Generation, head: ChatCompletionChunk, include_usage: bool) -> Iterator[str]:
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return f"data: {head.model_copy(update={'choices': choices, 'usage': usage}).model_dump_json()}\n\n"

    yield chunk([ChunkChoice(delta=Delta(role="assistant"))])
    for event in events:
        if isinstance(event, str):
            yield chunk([ChunkChoice(delta=Delta(content=event))])
        else:
            done = event
    yield chunk([ChunkChoice(delta=Delta(), finish_reason=done.finish_reason)])
    if include_usage:
        yield chunk([], usage=_usage(done))
    yield "data: [DONE]\n\n"


def _usage(done: Completion) -> Usage:
    total = done.prompt_tokens + done.completion_tokens
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens, total_tokens=total)


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)
