"""Optional filter: score each row's perplexity under the base model and drop the outliers."""

from __future__ import annotations

import math

from tuneloop.artifacts import BaseModelRef
from tuneloop.data.load import Row


def perplexity_outliers(rows: list[Row], base: BaseModelRef, percentile: float, batch_size: int = 8) -> set[str]:
    """Sources of the rows whose perplexity is above `percentile` of all rows' perplexities."""
    if not rows:
        return set()
    scores = _perplexities(rows, base, batch_size)
    ranked = sorted(scores)
    cutoff = ranked[min(len(ranked) - 1, math.ceil(percentile / 100 * len(ranked)) - 1)]
    return {row.source for row, score in zip(rows, scores) if score > cutoff}


def _perplexities(rows: list[Row], base: BaseModelRef, batch_size: int) -> list[float]:
    import torch

    from tuneloop.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(base)
    tokenizer.padding_side = "right"
    model = load_model(base).eval()
    scores = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            texts = [tokenizer.apply_chat_template(r.messages, tokenize=False) for r in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            logits = model(**batch).logits[:, :-1]  # (B, T-1, V)
            targets = batch["input_ids"][:, 1:]  # (B, T-1)
            mask = batch["attention_mask"][:, 1:].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
            mean = (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
            scores += torch.exp(mean).tolist()
    return scores
