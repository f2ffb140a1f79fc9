"""Generation for the server: one base model in memory, its LoRA adapters switched per request by name."""

from __future__ import annotations

import threading
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tuneloop.artifacts import BaseModelRef
from tuneloop.errors import TuneloopError
from tuneloop.models import load_model, load_tokenizer
from tuneloop.train.template import prompt_ids


class UnknownModelError(TuneloopError):
    """A request named a model this server does not serve."""

    def __init__(self, name: str, available: list[str]):
        super().__init__(f"The model {name!r} does not exist; available models: {', '.join(available)}")


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float | None = None  # 0 or None: greedy
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


Generation = Generator[str | Completion, None, None]  # the answer's text in pieces, then its Completion


class Engine:
    """A base model and LoRA adapters on top of it (plus any fully fine-tuned versions, each a model of its
    own), answering one request at a time."""

    def __init__(self, base: BaseModelRef, adapters: dict[str, Path]):
        if base.name in adapters:
            raise TuneloopError(f"adapter name {base.name!r} is already the base model's name")
        self.base = base
        self.tokenizer = load_tokenizer(base)
        model = load_model(base)
        eos = model.generation_config.eos_token_id
        self._eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        # Fully fine-tuned versions are whole models of their own; the rest are LoRA adapters on the base.
        full = {name: path for name, path in adapters.items() if not (Path(path) / "adapter_config.json").is_file()}
        lora = {name: path for name, path in adapters.items() if name not in full}
        if lora:
            from peft import PeftModel

            (first, first_path), *rest = lora.items()
            model = PeftModel.from_pretrained(model, first_path, adapter_name=first)
            for name, path in rest:
                model.load_adapter(path, adapter_name=name)
        self.model = model.eval()
        self._has_lora = bool(lora)
        self._full_models = {name: load_model(BaseModelRef(name, Path(path))).eval() for name, path in full.items()}
        self.adapter_names = list(adapters)
        self._lock = threading.Lock()  # one model in memory: generations take turns, adapters switch between them

    @property
    def model_names(self) -> list[str]:
        return [self.base.name, *self.adapter_names]

    def complete(self, model: str, messages: list[dict[str, str]], sampling: Sampling) -> Completion:
        """Answer the chat `messages` with `model` (the base model's or an adapter's name)."""
        *_, done = self.stream(model, messages, sampling)
        return done

    def stream(self, model: str, messages: list[dict[str, str]], sampling: Sampling) -> Generation:
        """Yield the answer's text in pieces as it is generated, then its `Completion`.

        An unknown `model` raises `UnknownModelError` here, before anything is generated.
        """
        if model not in self.model_names:
            raise UnknownModelError(model, self.model_names)
        prompt = prompt_ids(self.tokenizer, messages)  # the prompt the model was trained and evaluated on
        return self._generate(model, prompt, sampling)

    def _generate(self, model: str, prompt: list[int], sampling: Sampling) -> Generation:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        result: dict[str, Any] = {}
        worker = threading.Thread(
            target=self._run, args=(model, prompt, sampling, streamer, cancelled, result), daemon=True
        )
        worker.start()
        text, sent, stopped = "", 0, False
        try:
            for piece in streamer:
                text += piece
                # Stop strings are matched here on the decoded text (not by generate's token-level
                # matcher), so the cut is exact; breaking out cancels the generation.
                cut = _first_stop(text, sampling.stop)
                if cut is not None:
                    text, stopped = text[:cut], True
                    break
                # Hold back a tail that may be the start of a stop string until the next piece decides.
                safe = len(text) - _partial_stop_length(text, sampling.stop)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
        finally:
            # Also runs when the consumer goes away (a client disconnected): the generation stops at its next token.
            cancelled.set()
        worker.join()
        if "error" in result:
            raise result["error"]
        if len(text) > sent:
            yield text[sent:]

        tokens: list[int] = result["tokens"]
        ended = bool(tokens) and tokens[-1] in self._eos_ids
        hit_limit = not stopped and not ended and len(tokens) >= sampling.max_tokens
        yield Completion(
            text=text,
            finish_reason="length" if hit_limit else "stop",
            prompt_tokens=len(prompt),
            completion_tokens=len(tokens) - ended,
        )

    def _run(self, model, prompt, sampling, streamer, cancelled: threading.Event, result: dict[str, Any]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class UntilCancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

        try:
            with self._lock, self._using(model), torch.inference_mode():
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                output = self._full_models.get(model, self.model).generate(
                    input_ids=torch.tensor([prompt]),  # (1, T)
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([UntilCancelled()]),
                    **self._generation_kwargs(sampling),
                )
            result["tokens"] = output[0, len(prompt) :].tolist()
        except Exception as err:  # handed to the consuming thread, which re-raises it
            result["error"] = err
            streamer.end()

    @contextmanager
    def _using(self, name: str):
        if name in self._full_models:
            yield
            return
        if name == self.base.name and self._has_lora:
            with self.model.disable_adapter():
                yield
            return
        if name != self.base.name:
            self.model.set_adapter(name)
        yield

    def _generation_kwargs(self, sampling: Sampling) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if not sampling.temperature:
            return kwargs | {"do_sample": False}
        # OpenAI's sampling has no top-k; 0 turns off any top_k the model's generation config sets.
        top_p = 1.0 if sampling.top_p is None else sampling.top_p
        return kwargs | {"do_sample": True, "temperature": sampling.temperature, "top_p": top_p, "top_k": 0}


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _partial_stop_length(text: str, stop: tuple[str, ...]) -> int:
    # The longest end of `text` that is the beginning of a stop string.
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
