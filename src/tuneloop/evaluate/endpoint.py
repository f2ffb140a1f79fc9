"""Answers from any OpenAI-compatible endpoint: concurrent requests, retries with back-off, the same
`Generation` records as local generation."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

from tuneloop.config import EndpointConfig
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.generate import Generation

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible chat-completions API and the model to ask there."""

    base_url: str
    model: str
    api_key: str | None = None
    concurrency: int = 4
    max_retries: int = 4
    timeout_s: float = 120.0

    @classmethod
    def from_config(cls, cfg: EndpointConfig, api_key: str | None) -> Endpoint:
        return cls(cfg.base_url, cfg.model, api_key, cfg.concurrency, cfg.max_retries, cfg.timeout_s)


def client(endpoint: Endpoint):
    """An `openai` client for `endpoint`; its own retry loop backs off exponentially on HTTP 408, 409, 429,
    5xx, timeouts and lost connections, `max_retries` times."""
    from openai import OpenAI

    # An explicit key (a placeholder without one), so the client never falls back to its own env variables.
    return OpenAI(
        base_url=endpoint.base_url,
        api_key=endpoint.api_key or "unused",
        max_retries=endpoint.max_retries,
        timeout=endpoint.timeout_s,
    )


def chat(openai_client, endpoint: Endpoint, messages: list[dict[str, str]], max_tokens: int) -> Generation:
    """One greedy chat completion, timed; a request that still fails after the retries raises TuneloopError."""
    import openai

    started = time.perf_counter()
    try:
        reply = openai_client.chat.completions.create(
            model=endpoint.model, messages=messages, max_tokens=max_tokens, temperature=0
        )
    except openai.OpenAIError as err:
        raise TuneloopError(
            f"endpoint {endpoint.base_url} (model {endpoint.model!r}): {type(err).__name__}: {str(err)[:300]}"
        ) from None
    latency_ms = (time.perf_counter() - started) * 1000
    choices = getattr(reply, "choices", None)  # a non-JSON 200 reply comes back as a plain string
    if not choices or getattr(choices[0], "message", None) is None:
        shown = reply if isinstance(reply, str) else getattr(reply, "model_dump_json", lambda: repr(reply))()
        raise TuneloopError(
            f"endpoint {endpoint.base_url} (model {endpoint.model!r}): not a chat completion "
            f"(no choices[0].message): {str(shown)[:200]!r}"
        )
    usage = reply.usage
    return Generation(
        text=choices[0].message.content or "",
        latency_ms=latency_ms,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
    )


def in_parallel(function: Callable[[T], R], items: list[T], concurrency: int) -> list[R]:
    """`function` over `items` with `concurrency` threads, results in the order of `items`."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(function, items))


def generate_answers(
    endpoint: Endpoint, prompts: list[list[dict[str, str]]], max_new_tokens: int, label: str
) -> list[Generation]:
    """Answer each chat prompt through `endpoint`, `endpoint.concurrency` requests at a time."""
    from rich.console import Console

    openai_client = client(endpoint)
    with Console(stderr=True).status(f"{label}: {len(prompts)} requests to {endpoint.base_url}"):
        return in_parallel(lambda p: chat(openai_client, endpoint, p, max_new_tokens), prompts, endpoint.concurrency)
