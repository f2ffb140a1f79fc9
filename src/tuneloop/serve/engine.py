"""What the app asks of a generation engine, and what it gets back.

Two engines implement `Engine`: `batching.BatchingEngine` (built in; continuous batching on CPU or CUDA)
and `vllm.VllmEngine` (vLLM's own OpenAI server in a subprocess, for GPU production). The app applies each
served model's trained contract (system prompt, answer schema, sampling defaults) before it calls either.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from tuneloop.errors import TuneloopError

FinishReason = Literal["stop", "length"]


class UnknownModelError(TuneloopError):
    """A request named a model this server does not serve."""

    def __init__(self, name: str, available: list[str]):
        super().__init__(f"The model {name!r} does not exist; available models: {', '.join(available)}")


class InvalidRequestError(TuneloopError):
    """A request the engine cannot answer as asked (a prompt longer than the context, a schema that does not
    compile, ...); the app answers 400 naming `param`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float | None = None  # 0 or None: greedy
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None  # seeds this request's own generator; the global RNG is never touched
    # max_tokens was not given: shorten it to what the context holds after the prompt instead of refusing
    fit_to_context: bool = False


@dataclass(frozen=True)
class EngineRequest:
    """One generation: a chat (`messages`, rendered with the model's chat template) or a raw `prompt`."""

    model: str
    sampling: Sampling
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    # None, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


# The answer's text in pieces as it is generated, then its Completion. Closing it early (a client that went
# away) frees the request's place in the engine at its next step.
Generation = AsyncIterator[str | Completion]


@dataclass(frozen=True)
class ServedModel:
    """A model the server answers under `name`: the base model (`parent` None) or a registered version of it."""

    name: str
    path: Path
    parent: str | None = None
    kind: Literal["base", "adapter", "full"] = "base"
    system_prompt: str | None = None  # the system prompt the version was trained with
    answer_schema: dict[str, Any] | None = field(default=None, hash=False, compare=False)


class Engine(Protocol):
    def models(self) -> list[ServedModel]:
        """The served models, base model first."""
        ...

    def generate(self, request: EngineRequest) -> Generation:
        """Start answering `request`. Raises `UnknownModelError` or `InvalidRequestError` at once, before
        anything is generated."""
        ...

    async def start(self) -> None:
        """Called once the event loop runs, before the first request."""
        ...

    async def sync(self, versions: list[ServedModel]) -> list[ServedModel]:
        """Serve exactly `versions` beside the base model from now on; requests already running finish on the
        version they started with. A version that does not load is logged, not served, and a name that
        served an older version keeps it. Returns the versions served."""
        ...

    async def close(self) -> None:
        """Stop generating and free what the engine holds."""
        ...
