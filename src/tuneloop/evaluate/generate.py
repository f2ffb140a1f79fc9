"""Batched greedy generation for evaluation: KV cache, the prompts' shared prefix encoded once, longest
prompts first."""

from __future__ import annotations

import copy
import json
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


def answer_budget(tokenizer, train: Path) -> int:
    """The default generation budget: the longest training answer in tokens plus a quarter (at least 16
    tokens more), so that no answer as long as the references is cut."""
    longest = 0
    with train.open(encoding="utf-8") as handle:
        for line in handle:
            answer = json.loads(line)["messages"][-1]["content"]
            longest = max(longest, len(tokenizer(answer, add_special_tokens=False).input_ids))
    return longest + max(16, longest // 4)


def model_kind(directory: Path) -> str:
    """"adapter" for a PEFT adapter directory, "model" for a full (merged) model directory; either must hold
    its weights."""
    if (directory / "adapter_config.json").is_file():
        kind, weights = "adapter", ["adapter_model.safetensors", "adapter_model.bin"]
    elif (directory / "config.json").is_file():
        kind, weights = "model", ["*.safetensors", "pytorch_model*.bin"]
    else:
        raise TuneloopError(
            f"{directory}: neither a PEFT adapter (adapter_config.json) nor a model directory (config.json)"
        )
    if not any(any(directory.glob(pattern)) for pattern in weights):
        raise TuneloopError(f"{directory}: a {kind} directory without weights (no {' or '.join(weights)})")
    return kind


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

    tokenizer, model = load_for_generation(base, model_dir)
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
    `on_batch(rows, tokens_per_second)` follows the progress.

    The tokens every prompt starts with (the chat header, the system prompt, few-shot examples) are encoded
    once and their KV cache is copied into each batch; each prompt's own tokens follow, padded between the
    shared prefix and themselves so that every row's answer starts in the same column."""
    encoded = [prompt_ids(tokenizer, p) for p in prompts]  # exactly the prompt the model was trained on
    prefix = shared_prefix(encoded)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    results: list[Generation | None] = [None] * len(prompts)
    started = time.perf_counter()
    prefix_cache = _encode_prefix(model, prefix)
    prefix_ms_per_row = (time.perf_counter() - started) * 1000 / max(len(prompts), 1)
    generated_tokens = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        input_ids, attention_mask = _pad_after_prefix([encoded[i] for i in batch], len(prefix), tokenizer.pad_token_id)
        t0 = time.perf_counter()
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            cache=_copy_for_batch(prefix_cache, len(batch)),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        elapsed_ms = (time.perf_counter() - t0) * 1000
        new_tokens = output[:, input_ids.shape[1] :]  # (B, new)
        for row, tokens in zip(batch, new_tokens):
            n = _length_until_eos(tokens.tolist(), tokenizer)
            generated_tokens += n
            results[row] = Generation(
                text=tokenizer.decode(tokens[:n], skip_special_tokens=True),
                latency_ms=elapsed_ms / len(batch) + prefix_ms_per_row,
                prompt_tokens=len(encoded[row]),
                completion_tokens=n,
            )
        if on_batch is not None:
            on_batch(len(batch), generated_tokens / (time.perf_counter() - started))
    return results  # type: ignore[return-value]


def shared_prefix(encoded: list[list[int]]) -> list[int]:
    """The tokens all prompts start with, leaving each prompt at least one token of its own (the model
    needs one uncached token to produce the first answer token's logits)."""
    if not encoded:
        return []
    shortest = min(len(ids) for ids in encoded)
    prefix = encoded[0][: shortest - 1]
    for ids in encoded[1:]:
        same = next((i for i, (a, b) in enumerate(zip(prefix, ids)) if a != b), len(prefix))
        prefix = prefix[:same]
    return prefix


def _encode_prefix(model, prefix: list[int]):
    """The KV cache of the shared prefix, or None when there is none."""
    import torch
    from transformers import DynamicCache

    if not prefix:
        return None
    cache = DynamicCache(config=model.config)
    with torch.no_grad():  # also called between training steps, where gradients are on
        model(input_ids=torch.tensor([prefix], device=model.device), cache=cache, use_cache=True)
    return cache


def _copy_for_batch(prefix_cache, rows: int):
    if prefix_cache is None:
        return None
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(rows)
    return cache


def _pad_after_prefix(rows: list[list[int]], prefix_len: int, pad_id: int):
    """(B, T) input ids and attention mask: the shared prefix, then padding, then each row's own tokens.
    Positions come from the attention mask, so a row's tokens sit at the same positions as unpadded."""
    import torch

    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        own = len(ids) - prefix_len
        input_ids[r, :prefix_len] = torch.tensor(ids[:prefix_len], dtype=torch.long)
        input_ids[r, width - own :] = torch.tensor(ids[prefix_len:], dtype=torch.long)
        attention_mask[r, :prefix_len] = 1
        attention_mask[r, width - own :] = 1
    return input_ids, attention_mask


def load_for_generation(base: BaseModelRef, model_dir: Path | None):
    """(tokenizer, model): the base model, an adapter directory on top of it, or a full model directory in its
    place; one that cannot be loaded (wrong base model, missing or corrupt weights) is a TuneloopError."""
    from safetensors import SafetensorError

    if model_dir is None:
        return load_tokenizer(base), load_model(base)
    try:
        if model_kind(model_dir) == "adapter":
            from tuneloop.train.merge import merged_model

            # Folded into a copy of the base: it answers as the adapter does, at the base model's speed.
            return load_tokenizer(base), merged_model(base, model_dir)
        full = BaseModelRef(str(model_dir), model_dir, base.trust_remote_code)
        # A merged model saved without its tokenizer answers with the base model's.
        has_tokenizer = (model_dir / "tokenizer_config.json").is_file()
        return load_tokenizer(full if has_tokenizer else base), load_model(full)
    except (RuntimeError, OSError, ValueError, SafetensorError) as err:  # e.g. another base model, truncated weights
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise TuneloopError(f"{model_dir}: cannot load it on {base.name}: {reason}") from None


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
