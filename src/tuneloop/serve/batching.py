"""The built-in engine: continuous batching over one base model, its LoRA adapters and fully fine-tuned
versions, on CPU or CUDA.

One scheduler thread owns the models. At every step it admits waiting requests into free slots, runs one
forward pass per set of weights (the base model with all its adapters is one set: each row of the batch
names its adapter, see lora.py), samples one token for every request whose input is
consumed, and lets finished or abandoned requests leave. Requests never wait for each other's answers
to end. A version's system prompt is encoded once per served model and its KV cache copied into each
new request that starts with it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import ServeConfig
from tuneloop.errors import TuneloopError
from tuneloop.models import bf16_capable, load_model, load_tokenizer
from tuneloop.serve.engine import (
    Completion,
    EngineRequest,
    Generation,
    InvalidRequestError,
    ServedModel,
    UnknownModelError,
)
from tuneloop.train.template import prompt_ids

log = logging.getLogger("tuneloop.serve")

PREFILL_TOKENS_PER_STEP = 512  # prompt tokens taken into one step, so long prompts do not stall decoding
BASE = "base"  # key of the base model's weights


@dataclass(eq=False)
class _Request:
    weights: str  # key of the weights it runs on: BASE, or a full version's directory
    adapter: str | None  # key (directory) of the LoRA adapter its rows use, None for none
    tokens: list[int]  # prompt, then the generated tokens
    prompt_tokens: int
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    prefix: tuple[int, ...] = ()  # a system-prompt prefix whose KV cache is kept for later requests
    matcher: Any = None  # the response format's grammar state, when constrained
    generator: Any = None  # torch.Generator for sampling
    cached: int = 0  # tokens already in the slot's KV cache
    slot: int = -1
    sent: int = 0  # characters of the answer already streamed
    cancelled: bool = False
    done: bool = False

    @property
    def prefix_key(self) -> tuple[str, tuple[int, ...]]:
        # An adapter changes the keys and values: a prefix's cache belongs to one version's weights.
        return (self.adapter or self.weights, self.prefix)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_tokens :]

    def emit(self, item: str | Completion | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody is waiting for this any more
            self.cancelled = True


@dataclass(eq=False)
class _Weights:
    """One set of weights in memory with the requests decoding on it, one KV slot each."""

    model: Any
    lm_head: Any  # (V, hidden) weight; the model's own head is replaced so the forward returns hidden states
    lm_bias: Any
    cache: Any  # kv.SlotCache
    adapters: Any  # lora.AdapterRows, None for weights without adapters
    running: list[_Request] = field(default_factory=list)  # index = slot


class BatchingEngine:
    """Continuous batching on the base model of `base` and every version in `versions`."""

    def __init__(self, cfg: ServeConfig, base: ServedModel, versions: list[ServedModel], trust_remote_code: bool = False):
        import torch

        from tuneloop.serve import kv
        from tuneloop.serve.lora import AdapterStack

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        kv.register_attention()
        self.cfg = cfg
        self.base = base
        self.trust_remote_code = trust_remote_code
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and bf16_capable(self.device.type == "cuda"))
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        base_ref = BaseModelRef(base.name, base.path, trust_remote_code)
        self.tokenizer = load_tokenizer(base_ref)

        model = load_model(base_ref)
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        eos = model.generation_config.eos_token_id
        self._eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self._weights: dict[str, _Weights] = {BASE: self._prepare(model)}
        self._weights[BASE].adapters = AdapterStack(self._weights[BASE].model, self.dtype, self.device)
        self._loras: dict[str, Any] = {}  # adapter key (its directory) -> lora.LoraWeights
        # served name -> (its ServedModel, weights key, adapter key or None); replaced whole by `sync`
        self._routes: dict[str, tuple[ServedModel, str, str | None]] = {base.name: (base, BASE, None)}
        self.vocab_size = self._weights[BASE].lm_head.shape[0]

        from tuneloop.serve.grammar import GrammarCompiler

        self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size)  # once: it indexes the vocabulary
        self._prefixes: OrderedDict[tuple[str, tuple[int, ...]], list] = OrderedDict()
        self._waiting: deque[_Request] = deque()
        self._jobs: deque[tuple[Any, threading.Event]] = deque()  # run by the scheduler between steps
        self._wakeup = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.stats = {"steps": 0, "prompt_tokens_computed": 0, "prefix_hits": 0}
        self.refused: dict[str, str] = {}  # served name -> why its version did not load, from the last sync
        self._apply_versions(versions)

    def _prepare(self, model) -> _Weights:
        import torch

        from tuneloop.serve import kv

        causal_lm = model.to(device=self.device, dtype=self.dtype).eval()
        head = causal_lm.lm_head
        if not isinstance(head, torch.nn.Linear):
            raise TuneloopError(f"{type(head).__name__} output layers are not served by this engine")
        causal_lm.lm_head = torch.nn.Identity()  # the forward returns hidden states; logits only where needed
        causal_lm.set_attn_implementation(kv.ATTENTION)
        cache = kv.SlotCache(causal_lm.config, self.cfg.max_batch_size, self.dtype, self.device)
        bias = None if head.bias is None else head.bias.detach()
        return _Weights(causal_lm, head.weight.detach(), bias, cache, None)

    # ---- which versions are served ----

    async def sync(self, versions: list[ServedModel]) -> list[ServedModel]:
        """Serve exactly `versions` (beside the base model) from now on. New ones are loaded first; a version
        that does not load is logged and, when its name served an older version, that one stays. Requests
        already running finish on the version they started with. Returns the versions served."""
        await asyncio.to_thread(self._apply_versions, versions)
        return self.models()[1:]

    def _apply_versions(self, versions: list[ServedModel]) -> None:
        from tuneloop.serve.lora import load_lora

        routes = {self.base.name: self._routes[self.base.name]}
        loras, fulls, refused = {}, {}, {}
        for version in versions:
            key = str(version.path)
            try:
                if version.name == self.base.name:
                    raise TuneloopError(f"{version.name!r} is already the base model's name")
                if version.kind == "adapter":
                    loras[key] = self._loras.get(key) or load_lora(version.path, self._weights[BASE].model)
                    routes[version.name] = (version, BASE, key)
                else:
                    fulls[key] = self._weights.get(key) or self._prepare(
                        load_model(BaseModelRef(version.name, version.path, self.trust_remote_code))
                    )
                    routes[version.name] = (version, key, None)
            except (TuneloopError, OSError, ValueError, RuntimeError) as err:
                reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                refused[version.name] = reason
                previous = self._routes.get(version.name)
                log.error("%s: not loaded (%s)%s", version.name, reason,
                          "; the version it served before stays" if previous else "")
                if previous is not None:
                    routes[version.name] = previous
                    weights_key, adapter_key = previous[1], previous[2]
                    if adapter_key is not None:
                        loras[adapter_key] = self._loras[adapter_key]
                    elif weights_key != BASE:
                        fulls[weights_key] = self._weights[weights_key]
        # New requests take the new routes at once; the scheduler installs the weights before it admits them.
        self._routes, self.refused = routes, refused
        self._run_between_steps(lambda: self._install(loras, fulls))

    def _install(self, loras: dict[str, Any], fulls: dict[str, _Weights]) -> None:
        """Scheduler thread: serve `loras` and `fulls`, keeping what running or waiting requests still use."""
        busy = [*self._waiting, *(item for w in self._weights.values() for item in w.running)]
        for item in busy:
            if item.adapter is not None and item.adapter not in loras:
                loras[item.adapter] = self._loras[item.adapter]
            if item.weights != BASE and item.weights not in fulls:
                fulls[item.weights] = self._weights[item.weights]
        if list(loras) != list(self._loras):
            self._weights[BASE].adapters.set(loras)
        self._loras = loras
        self._weights = {BASE: self._weights[BASE], **fulls}
        for stale in [key for key in self._prefixes if key[0] not in {BASE, *loras, *fulls}]:
            del self._prefixes[stale]

    def _run_between_steps(self, job) -> None:
        if self._thread is None or not self._thread.is_alive() or threading.current_thread() is self._thread:
            job()
            return
        done = threading.Event()
        with self._wakeup:
            self._jobs.append((job, done))
            self._wakeup.notify()
        done.wait()

    # ---- the Engine interface ----

    def models(self) -> list[ServedModel]:
        return [served for served, _, _ in self._routes.values()]

    def running(self) -> int:
        """Requests holding a slot now."""
        return sum(len(w.running) for w in self._weights.values())

    def prefix_keys(self) -> list[tuple[str, tuple[int, ...]]]:
        """(version key, prefix tokens) of each cached system-prompt prefix: the key is the adapter's or full
        model's directory, or BASE."""
        return list(self._prefixes)

    async def start(self) -> None:
        self._ensure_running()

    def _ensure_running(self) -> None:
        with self._wakeup:
            if self._thread is None or not self._thread.is_alive():
                self._closing = False
                self._thread = threading.Thread(target=self._run, name="tuneloop-batching", daemon=True)
                self._thread.start()

    async def close(self) -> None:
        """Stop the scheduler; requests still running end with an error. `start` runs it again."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify_all()
        if self._thread is not None and self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 30)

    def generate(self, request: EngineRequest) -> Generation:
        route = self._routes.get(request.model)  # resolved once: the request stays on this version
        if route is None:
            raise UnknownModelError(request.model, list(self._routes))
        self._ensure_running()
        prompt, prefix = self._encode(request)
        if len(prompt) >= self.context:
            raise InvalidRequestError(
                f"the prompt is {len(prompt)} tokens; {request.model}'s context is {self.context} tokens",
                param="messages" if request.messages is not None else "prompt",
            )
        room = self.context - len(prompt)
        if request.sampling.max_tokens > room and not request.sampling.fit_to_context:
            raise InvalidRequestError(
                f"max_tokens is {request.sampling.max_tokens}, but only {room} tokens of {request.model}'s context "
                f"of {self.context} remain after the prompt's {len(prompt)}",
                param="max_tokens",
            )
        _, weights, adapter = route
        item = _Request(
            weights=weights,
            adapter=adapter,
            tokens=list(prompt),
            prompt_tokens=len(prompt),
            request=request,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            prefix=prefix,
            matcher=self._matcher(request.response_format),
            generator=self._generator(request.sampling.seed) if request.sampling.temperature else None,
        )
        with self._wakeup:
            if self._closing:
                raise TuneloopError("the server is shutting down")
            self._waiting.append(item)
            self._wakeup.notify()
        return self._events(item)

    async def _events(self, item: _Request) -> Generation:
        try:
            while True:
                event = await item.events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Completion):
                    return
        finally:
            item.cancelled = True  # a client that went away: its slot is freed at the next step

    # ---- preparing a request (caller's thread) ----

    def _encode(self, request: EngineRequest) -> tuple[list[int], tuple[int, ...]]:
        if request.prompt is not None:
            return self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"], ()
        prompt = prompt_ids(self.tokenizer, request.messages)  # the prompt the versions were trained on
        prefix: tuple[int, ...] = ()
        first = request.messages[0]
        if self.cfg.prefix_cache_size and first["role"] == "system":
            system = _system_turn(self.tokenizer, first["content"])
            if len(system) < len(prompt) and tuple(prompt[: len(system)]) == system:
                prefix = system
        return prompt, prefix

    def _matcher(self, response_format: dict[str, Any] | None):
        if not response_format or response_format.get("type") == "text":
            return None
        return self._grammars.compile(response_format).matcher()

    def _generator(self, seed: int | None):
        import torch

        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        return generator

    # ---- the scheduler thread ----

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not (self._closing or self._waiting or self._jobs or any(w.running for w in self._weights.values())):
                        self._wakeup.wait()
                    if self._closing:
                        break
                    jobs, self._jobs = list(self._jobs), deque()
                for job, done in jobs:
                    try:
                        job()
                    finally:
                        done.set()
                with self._wakeup:
                    waiting, self._waiting = list(self._waiting), deque()
                self._admit(waiting)
                for weights in self._weights.values():
                    if weights.running:
                        self._step_safely(weights)
        for weights in self._weights.values():
            for item in list(weights.running):
                item.emit(TuneloopError("the server shut down before the answer was complete"))
                self._leave(weights, item)
        with self._wakeup:
            for item in self._waiting:
                item.emit(TuneloopError("the server shut down before the answer was started"))
            self._waiting.clear()
            for job, done in self._jobs:  # nothing runs now: the job can run in its caller's stead
                job()
                done.set()
            self._jobs.clear()

    def _admit(self, waiting: list[_Request]) -> None:
        deferred = []
        for item in waiting:
            if item.cancelled:
                continue
            weights = self._weights.get(item.weights)
            if weights is None or (item.adapter is not None and item.adapter not in self._loras):
                item.emit(TuneloopError("the version was unloaded while the request waited; send it again"))
                continue
            if len(weights.running) >= self.cfg.max_batch_size:
                deferred.append(item)
                continue
            item.slot = len(weights.running)
            weights.running.append(item)
            cached = self._prefixes.get(item.prefix_key) if item.prefix else None
            if cached is not None:
                self._prefixes.move_to_end(item.prefix_key)
                weights.cache.copy_in(item.slot, cached)
                item.cached = len(item.prefix)
                self.stats["prefix_hits"] += 1
            else:
                weights.cache.lengths[item.slot] = 0
        if deferred:
            with self._wakeup:
                self._waiting.extendleft(reversed(deferred))

    def _step_safely(self, weights: _Weights) -> None:
        try:
            self._step(weights)
        except Exception as err:  # noqa: BLE001 - one failed step must not stop the server
            log.exception("generation step failed; its requests are ended with an error")
            for item in list(weights.running):
                item.emit(TuneloopError(f"generation failed: {type(err).__name__}"))
                self._leave(weights, item)

    def _step(self, weights: _Weights) -> None:
        import torch

        from tuneloop.serve import kv

        for item in [i for i in weights.running if i.cancelled]:
            self._leave(weights, item)
        if not weights.running:
            return

        # 1. Rows of this step: each request's tokens not yet in its cache (one when decoding, a chunk of
        #    prompt when prefilling, within the step's prefill budget).
        ids, positions, slots, adapters, prefills = [], [], [], [], []
        decode_rows, decode_slots, last_rows, finishing = [], [], [], []
        budget = PREFILL_TOKENS_PER_STEP
        for item in weights.running:
            remaining = len(item.tokens) - item.cached
            take = remaining if remaining == 1 else min(remaining, max(budget, 0))
            if take == 0:
                continue
            if take > 1:
                budget -= take
            if item.cached < item.prompt_tokens:
                self.stats["prompt_tokens_computed"] += min(take, item.prompt_tokens - item.cached)
            start_row = len(ids)
            ids += item.tokens[item.cached : item.cached + take]
            positions += range(item.cached, item.cached + take)
            slots += [item.slot] * take
            adapters += [item.adapter] * take
            if take == 1:
                decode_rows.append(start_row)
                decode_slots.append(item.slot)
            else:
                prefills.append(kv.Prefill(item.slot, item.cached, slice(start_row, start_row + take)))
            item.cached += take
            weights.cache.lengths[item.slot] = item.cached
            if item.cached == len(item.tokens):
                last_rows.append(len(ids) - 1)
                finishing.append(item)
        if not ids:
            return
        self.stats["steps"] += 1
        weights.cache.reserve(max(i.cached for i in weights.running))
        device = self.device
        plan = kv.StepPlan(
            cache=weights.cache,
            slots=torch.tensor(slots, device=device),
            positions=torch.tensor(positions, device=device),
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
            decode_slots=decode_slots,
            prefills=prefills,
            lengths=torch.tensor(weights.cache.lengths, device=device),
        )

        # 2. One forward pass for every row; logits only at each request's last row.
        if weights.adapters is not None:
            weights.adapters.select(adapters)
        hidden = weights.model(
            input_ids=torch.tensor(ids, device=device)[:, None],  # (N, 1)
            position_ids=torch.tensor(positions, device=device)[:, None],
            step=plan,
            use_cache=False,
        ).logits[:, 0]  # (N, hidden): the head is an identity
        logits = hidden[last_rows] @ weights.lm_head.T  # (B, V)
        if weights.lm_bias is not None:
            logits += weights.lm_bias
        logits = logits.float()

        # 3. A token for every request whose input is consumed; then answers stream and finished ones leave.
        for item in finishing:
            if item.prefix and item.cached >= len(item.prefix) and item.prefix_key not in self._prefixes:
                self._keep_prefix(weights, item)
        tokens = self._choose(logits, finishing)
        for item, token in zip(finishing, tokens):
            self._advance(weights, item, token)

    def _choose(self, logits, requests: list[_Request]) -> list[int]:
        import torch

        constrained = [row for row, item in enumerate(requests) if item.matcher is not None]
        if constrained:
            from tuneloop.serve.grammar import allocate_mask, apply_mask

            mask = allocate_mask(len(requests), logits.shape[1])
            for row in constrained:
                requests[row].matcher.fill_mask(mask, row)
            apply_mask(logits, mask)
        chosen = logits.argmax(dim=-1).tolist()
        for row, item in enumerate(requests):
            sampling = item.request.sampling
            if sampling.temperature:
                probs = torch.softmax(logits[row] / sampling.temperature, dim=-1)
                if sampling.top_p is not None and sampling.top_p < 1.0:
                    probs = _nucleus(probs, sampling.top_p)
                chosen[row] = int(torch.multinomial(probs, 1, generator=item.generator))
        return chosen

    def _advance(self, weights: _Weights, item: _Request, token: int) -> None:
        if item.cancelled:
            self._leave(weights, item)
            return
        item.tokens.append(token)
        if item.matcher is not None:
            item.matcher.accept(token)
        ended = token in self._eos_ids or (item.matcher is not None and item.matcher.finished)
        answer = item.generated[:-1] if token in self._eos_ids else item.generated
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        stop = item.request.sampling.stop
        cut = _first_stop(text, stop)
        if cut is not None:
            text, ended = text[:cut], True
        sampling = item.request.sampling
        limit = min(sampling.max_tokens, self.context - item.prompt_tokens)
        hit_limit = not ended and len(item.generated) >= limit
        if not (ended or hit_limit):
            if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
                return
            safe = len(text) - _partial_stop_length(text, stop)
            if safe > item.sent:
                item.emit(text[item.sent : safe])
                item.sent = safe
            return
        if len(text) > item.sent:
            item.emit(text[item.sent :])
        item.emit(
            Completion(
                text=text,
                finish_reason="length" if hit_limit else "stop",
                prompt_tokens=item.prompt_tokens,
                completion_tokens=len(answer),
            )
        )
        self._leave(weights, item)

    def _leave(self, weights: _Weights, item: _Request) -> None:
        """Free `item`'s slot: the last running request moves into it, keeping slots 0..n-1 in use."""
        if item.done:
            return
        item.done = True
        last = weights.running.pop()
        if last is not item:
            weights.cache.move(last.slot, item.slot)
            last.slot = item.slot
            weights.running[item.slot] = last

    def _keep_prefix(self, weights: _Weights, item: _Request) -> None:
        self._prefixes[item.prefix_key] = weights.cache.copy_out(item.slot, len(item.prefix))
        while len(self._prefixes) > self.cfg.prefix_cache_size:
            self._prefixes.popitem(last=False)


@lru_cache(maxsize=256)
def _system_turn(tokenizer, content: str) -> tuple[int, ...]:
    """The tokens of a chat's system turn alone, as the chat template renders it."""
    ids = tokenizer.apply_chat_template([{"role": "system", "content": content}], tokenize=True, return_dict=True)
    return tuple(ids["input_ids"])


def _nucleus(probs, top_p: float):
    import torch

    ordered, order = torch.sort(probs, descending=True)
    outside = ordered.cumsum(-1) - ordered > top_p  # tokens after the smallest set reaching top_p
    ordered[outside] = 0.0
    kept = torch.zeros_like(probs).scatter_(0, order, ordered)
    return kept / kept.sum()


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _partial_stop_length(text: str, stop: tuple[str, ...]) -> int:
    # The longest end of `text` that is the beginning of a stop string.
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
