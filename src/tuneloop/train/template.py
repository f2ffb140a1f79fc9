"""Training examples tokenized with the model's own chat template, with completion-only labels.

The prompt part is exactly what generation and serving build for the same messages
(`apply_chat_template(..., add_generation_prompt=True)`), so the model is trained on the prompt it will
see. Everything after it — the assistant's answer and its end-of-turn token — is trained; the system
and user turns are masked."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100  # label of a position that is not trained


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens; the token itself on trained tokens (unshifted)
    truncated: bool


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The tokens a model is given before it answers: the chat so far plus the assistant header."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def encode_example(tokenizer, messages: list[dict[str, str]], max_length: int, completion_only: bool = True) -> Example:
    """Tokenize a chat whose last turn is the assistant's answer. Raises ValueError when the template
    renders the prompt differently inside the whole chat than on its own (masks would be wrong)."""
    prompt = prompt_ids(tokenizer, messages[:-1])
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    masked = len(prompt) if completion_only else 0
    labels = [IGNORE] * masked + full[masked:]
    truncated = len(full) > max_length
    return Example(full[:max_length], labels[:max_length], truncated)
