"""Batched greedy generation for evaluation: left padding, KV cache, longest prompts first."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tuneloop.artifacts import BaseModelRef
from tuneloop.errors import TuneloopError
from tuneloop.models import load_model, load_tokenizer
from tuneloop.train.template import prompt_ids


@dataclass(frozen=True)
class Generation:
    text: str
    latency_ms: float  # the batch's wall time shared among its rows
    prompt_tokens: int
    completion_tokens: int


def model_kind(directory: Path) -> str:
    """"adapter" for a PEFT adapter directory, "model" for a full (merged) model directory."""
    if (directory / "adapter_config.json").is_file():
        return "adapter"
    if (directory / "config.json").is_file():
        return "model"
    raise TuneloopError(
        f"{directory}: neither a PEFT adapter (adapter_config.json) nor a model directory (config.json)"
    )


def generate_answers(
    base: BaseModelRef,
    model_dir: Path | None,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    label: str,
) -> list[Generation]:
    """Answer each chat prompt greedily with the base model, with an adapter on top of it, or with a full
    (merged) model directory in its place (`model_dir`)."""
    import torch

    tokenizer, model = _load(base, model_dir)
    model.eval()
    with _progress(label) as progress, torch.inference_mode():
        task = progress.add_task(label, total=len(prompts), rate="")
        return answer_prompts(
            model, tokenizer, prompts, max_new_tokens, batch_size,
            on_batch=lambda rows, rate: progress.update(task, advance=rows, rate=f"{rate:,.0f} tok/s"),
        )


def answer_prompts(
    model,
    tokenizer,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    on_batch: Callable[[int, float], None] | None = None,
) -> list[Generation]:
    """Answer each chat prompt greedily with a loaded model in eval mode, in batches of similar length;
    `on_batch(rows, tokens_per_second)` follows the progress. The tokenizer is left as it was found."""
    encoded = [prompt_ids(tokenizer, p) for p in prompts]  # exactly the prompt the model was trained on
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    results: list[Generation | None] = [None] * len(prompts)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        generated_tokens = 0
        started = time.perf_counter()
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(model.device)
            t0 = time.perf_counter()
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            elapsed_ms = (time.perf_counter() - t0) * 1000
            new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (B, new)
            for row, tokens in zip(batch, new_tokens):
                n = _length_until_eos(tokens.tolist(), tokenizer)
                generated_tokens += n
                results[row] = Generation(
                    text=tokenizer.decode(tokens[:n], skip_special_tokens=True),
                    latency_ms=elapsed_ms / len(batch),
                    prompt_tokens=len(encoded[row]),
                    completion_tokens=n,
                )
            if on_batch is not None:
                on_batch(len(batch), generated_tokens / (time.perf_counter() - started))
    finally:
        tokenizer.padding_side = padding_side
    return results  # type: ignore[return-value]


def _load(base: BaseModelRef, model_dir: Path | None):
    if model_dir is None or model_kind(model_dir) == "adapter":
        model = load_model(base)
        if model_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, model_dir)
        return load_tokenizer(base), model
    full = BaseModelRef(str(model_dir), model_dir, base.trust_remote_code)
    # A merged model saved without its tokenizer answers with the base model's.
    has_tokenizer = (model_dir / "tokenizer_config.json").is_file()
    return load_tokenizer(full if has_tokenizer else base), load_model(full)


def _length_until_eos(tokens: list[int], tokenizer) -> int:
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for index, token in enumerate(tokens):
        if token in stops:
            return index
    return len(tokens)


def _progress(label: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
