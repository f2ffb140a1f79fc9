"""Preference accuracy on held-out pairs: does the model give the chosen answer a higher length-normalised
log-likelihood than the rejected one? Scored for the base model and the fine-tune on the same test pairs,
it says whether preference training (DPO) moved the model towards the chosen answers."""

from __future__ import annotations

from pathlib import Path

from tuneloop.artifacts import BaseModelRef
from tuneloop.evaluate.generate import load_for_generation
from tuneloop.train.template import IGNORE, encode_example


def has_pairs(rows: list[dict]) -> bool:
    return bool(rows) and all(row.get("rejected") for row in rows)


def preference_wins(base: BaseModelRef, model_dir: Path | None, rows: list[dict]) -> list[float]:
    """Per test pair, 1.0 when the model (the base, or `model_dir` on it) gives the chosen answer a higher mean
    per-token log-likelihood than the rejected one, else 0.0 (a tie is no win)."""
    import torch

    tokenizer, model = load_for_generation(base, model_dir)
    model.eval()
    wins = []
    with torch.inference_mode():
        for row in rows:
            prompt = row["messages"][:-1]
            chosen = _mean_log_likelihood(model, tokenizer, prompt, row["messages"][-1]["content"])
            rejected = _mean_log_likelihood(model, tokenizer, prompt, row["rejected"])
            wins.append(float(chosen > rejected))
    return wins


def _mean_log_likelihood(model, tokenizer, prompt: list[dict], answer: str) -> float:
    import torch

    example = encode_example(tokenizer, [*prompt, {"role": "assistant", "content": answer}], max_length=1 << 30)
    ids = torch.tensor([example.input_ids])
    targets = torch.tensor(example.labels[1:])
    trained = targets != IGNORE
    logits = model(input_ids=ids).logits[0, :-1].float()
    log_probs = torch.log_softmax(logits[trained], dim=-1).gather(1, targets[trained][:, None])
    return log_probs.mean().item()
