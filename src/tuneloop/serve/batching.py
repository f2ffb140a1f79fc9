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
from tuneloop.models import load_model, load_tokenizer
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


@dataclass(eq=False)
class _Request:
    served: str  # the served model name
    adapter: str | None  # the LoRA adapter its rows use, None for the base model or a full model
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
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_tokens :]

    def emit(self, item: str | Completion | Exception) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


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

        names = [base.name, *(v.name for v in versions)]
        if len(set(names)) != len(names):
            raise TuneloopError(f"served model names must be unique: {', '.join(names)}")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        kv.register_attention()
        self.cfg = cfg
        self._served = {model.name: model for model in [base, *versions]}
        self._order = names
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        base_ref = BaseModelRef(base.name, base.path, trust_remote_code)
        self.tokenizer = load_tokenizer(base_ref)

        model = load_model(base_ref)
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        eos = model.generation_config.eos_token_id
        self._eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        adapters = [v for v in versions if v.kind == "adapter"]
        rows = None
        if adapters:
            from tuneloop.serve.lora import stack_adapters

            model, rows = stack_adapters(_with_adapters(model, adapters))
        self._weights: dict[str, _Weights] = {base.name: self._prepare(model, rows)}
        self._weights_of = {base.name: base.name, **{a.name: base.name for a in adapters}}
        for version in versions:
            if version.kind == "full":
                full = load_model(BaseModelRef(version.name, version.path, trust_remote_code))
                self._weights[version.name] = self._prepare(full, None)
                self._weights_of[version.name] = version.name
        self.vocab_size = next(iter(self._weights.values())).lm_head.shape[0]

        from tuneloop.serve.grammar import GrammarCompiler

        self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size)  # once: it indexes the vocabulary
        self._prefixes: OrderedDict[tuple[str, tuple[int, ...]], list] = OrderedDict()
        self._waiting: deque[_Request] = deque()
        self._wakeup = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="tuneloop-batching", daemon=True)
        self.stats = {"steps": 0, "prompt_tokens_computed": 0, "prefix_hits": 0}

    def _prepare(self, model, adapters) -> _Weights:
        import torch

        from tuneloop.serve import kv

        causal_lm = model.to(device=self.device, dtype=self.dtype).eval()
        head = causal_lm.lm_head
        if not isinstance(head, torch.nn.Linear):  # an adapter on the output layer: not served here
            raise TuneloopError("an adapter that changes the output layer (lm_head) cannot be served by this engine")
        causal_lm.lm_head = torch.nn.Identity()  # the forward returns hidden states; logits only where needed
        causal_lm.set_attn_implementation(kv.ATTENTION)
        cache = kv.SlotCache(causal_lm.config, self.cfg.max_batch_size, self.dtype, self.device)
        bias = None if head.bias is None else head.bias.detach()
        return _Weights(causal_lm, head.weight.detach(), bias, cache, adapters)

    # ---- the Engine interface ----

    def models(self) -> list[ServedModel]:
        return [self._served[name] for name in self._order]

    def running(self) -> int:
        """Requests holding a slot now."""
        return sum(len(w.running) for w in self._weights.values())

    def prefix_keys(self) -> list[tuple[str, tuple[int, ...]]]:
        """(served model, prefix tokens) of each cached system-prompt prefix."""
        return list(self._prefixes)

    async def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    async def close(self) -> None:
        with self._wakeup:
            self._closing = True
            self._wakeup.notify_all()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 30)

    def generate(self, request: EngineRequest) -> Generation:
        if request.model not in self._served:
            raise UnknownModelError(request.model, self._order)
        if not self._thread.is_alive():
            self._thread.start()
        prompt, prefix = self._encode(request)
        if len(prompt) >= self.context:
            raise InvalidRequestError(
                f"the prompt is {len(prompt)} tokens; {request.model}'s context is {self.context} tokens",
                param="messages" if request.messages is not None else "prompt",
            )
        served = self._served[request.model]
        item = _Request(
            served=request.model,
            adapter=request.model if served.kind == "adapter" else None,
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
                    while not self._closing and not self._waiting and not any(w.running for w in self._weights.values()):
                        self._wakeup.wait()
                    if self._closing:
                        break
                    waiting, self._waiting = list(self._waiting), deque()
                self._admit(waiting)
                for weights in self._weights.values():
                    if weights.running:
                        self._step_safely(weights)
        for weights in self._weights.values():
            for item in weights.running:
                item.emit(TuneloopError("the server shut down before the answer was complete"))
        for item in self._waiting:
            item.emit(TuneloopError("the server shut down before the answer was started"))

    def _admit(self, waiting: list[_Request]) -> None:
        deferred = []
        for item in waiting:
            if item.cancelled:
                continue
            weights = self._weights[self._weights_of[item.served]]
            if len(weights.running) >= self.cfg.max_batch_size:
                deferred.append(item)
                continue
            item.slot = len(weights.running)
            weights.running.append(item)
            cached = self._prefixes.get((item.served, item.prefix)) if item.prefix else None
            if cached is not None:
                self._prefixes.move_to_end((item.served, item.prefix))
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
            weights.adapters.select(adapters, self.dtype, device)
        hidden = weights.model(
            input_ids=torch.tensor(ids, device=device)[:, None],  # (N, 1)
            position_ids=torch.tensor(positions, device=device)[:, None],
            step=plan,
            use_cache=False,
        ).logits[:, 0]  # (N, hidden): the head is an identity
        logits = hidden[last_rows].float() @ weights.lm_head.float().T  # (B, V)
        if weights.lm_bias is not None:
            logits += weights.lm_bias.float()

        # 3. A token for every request whose input is consumed; then answers stream and finished ones leave.
        for item in finishing:
            if item.prefix and item.cached >= len(item.prefix) and (item.served, item.prefix) not in self._prefixes:
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
        self._prefixes[(item.served, item.prefix)] = weights.cache.copy_out(item.slot, len(item.prefix))
        while len(self._prefixes) > self.cfg.prefix_cache_size:
            self._prefixes.popitem(last=False)


def _with_adapters(model, adapters: list[ServedModel]):
    from peft import PeftModel

    first, *rest = adapters
    try:
        model = PeftModel.from_pretrained(model, first.path, adapter_name=first.name)
        for adapter in rest:
            first = adapter
            model.load_adapter(adapter.path, adapter_name=adapter.name)
    except (RuntimeError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise TuneloopError(f"{first.name} ({first.path}): cannot load the adapter: {reason}") from None
    return model


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
