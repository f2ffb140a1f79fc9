"""Prometheus metrics of the server, under vLLM's names (and `vllm:` prefix) where they mean the same, so
dashboards built for vLLM read tuneloop too. Every series is labelled by the served model's name."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tuneloop.serve.engine import Completion, Generation

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        model = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests generating now.", model, registry=self.registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests accepted, first token not yet out.", model,
                             registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to the first token.", model,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token.", model,
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", model,
                                     registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated for finished requests.", model,
                                         registry=self.registry)
        self.success = Counter("vllm:request_success", "Requests answered to the end.", [*model, "finished_reason"],
                               registry=self.registry)
        self.rejected = Counter("tuneloop:requests_rejected", "Requests answered with an error status.", ["status"],
                                registry=self.registry)
        self.aborted = Counter("tuneloop:requests_aborted", "Requests whose client left or that failed while generating.",
                               model, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def track(self, model: str, generation: Generation, on_end=None) -> AsyncIterator[str | Completion]:
        """`generation` passed through, measured; `on_end()` runs once it is over, however it ends."""
        arrived, first = time.perf_counter(), None
        self.waiting.labels(model).inc()
        done = None
        try:
            async for event in generation:
                if first is None:
                    first = time.perf_counter()
                    self.waiting.labels(model).dec()
                    self.running.labels(model).inc()
                    self.ttft.labels(model).observe(first - arrived)
                if isinstance(event, Completion):
                    done = event
                yield event
        finally:
            (self.running if first is not None else self.waiting).labels(model).dec()
            if done is None:
                self.aborted.labels(model).inc()
            else:
                self.e2e.labels(model).observe(time.perf_counter() - arrived)
                self.prompt_tokens.labels(model).inc(done.prompt_tokens)
                self.generation_tokens.labels(model).inc(done.completion_tokens)
                self.success.labels(model, done.finish_reason).inc()
            await generation.aclose()
            if on_end is not None:
                on_end()
