"""Generation throughput of the eval stage: batched greedy generation against one prompt at a time, on
ticket-triage prompts with the task's system prompt and the default base model. Both paths run the eval
stage's own generation code (the prompts' shared prefix encoded once), only the batch size differs.

    python benchmarks/eval_throughput.py --prompts 64 --max-new-tokens 64 --batch-size 32

Both runs use the same prompts and the same max_new_tokens. Throughput counts the generated tokens up
to the end-of-turn token, over the time spent in generation, encoding the shared prefix included (model
loading and tokenization left out).
Prints a final JSON line with batched_tokens_per_s, sequential_tokens_per_s and their ratio, and how many
prompts got the same answer both ways (greedy decoding can differ only through padding numerics).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import demo_prompts  # noqa: E402  (beside this script)
from tuneloop.config import DEFAULT_BASE_MODEL, RunConfig, load_config
from tuneloop.evaluate.generate import Generation, generate_answers
from tuneloop.models import resolve_base_model



def chat_prompts(count: int) -> list[list[dict[str, str]]]:
    prompts = demo_prompts.chat_prompts(count)
    if len(prompts) < count:
        sys.exit(f"{demo_prompts.EXAMPLE}: only {len(prompts)} prompts, asked for {count}")
    return prompts


def tokens_per_s(generations: list[Generation]) -> tuple[int, float, float]:
    """Generated tokens, seconds spent generating them, and their rate."""
    tokens = sum(g.completion_tokens for g in generations)
    seconds = sum(g.latency_ms for g in generations) / 1000  # each batch's time is shared among its rows
    return tokens, seconds, tokens / seconds


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)  # eval.batch_size's default
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    args = parser.parse_args()

    cache_dir = RunConfig.model_fields["cache_dir"].default.expanduser()  # the same cache `tuneloop run` uses
    base = resolve_base_model(args.base_model, cache_dir)
    prompts = chat_prompts(args.prompts)
    generate_answers(base, None, prompts[:1], 4, 1, "warm-up")  # first-call costs stay out of both timings
    batched = generate_answers(base, None, prompts, args.max_new_tokens, args.batch_size, "batched")
    sequential = generate_answers(base, None, prompts, args.max_new_tokens, 1, "one at a time")

    batched_tokens, batched_s, batched_rate = tokens_per_s(batched)
    sequential_tokens, sequential_s, sequential_rate = tokens_per_s(sequential)
    same = sum(b.text == s.text for b, s in zip(batched, sequential))
    print(
        json.dumps(
            {
                "base_model": args.base_model,
                "prompts": args.prompts,
                "max_new_tokens": args.max_new_tokens,
                "batch_size": args.batch_size,
                "batched_tokens": batched_tokens,
                "batched_s": round(batched_s, 2),
                "batched_tokens_per_s": round(batched_rate, 1),
                "sequential_tokens": sequential_tokens,
                "sequential_s": round(sequential_s, 2),
                "sequential_tokens_per_s": round(sequential_rate, 1),
                "ratio": round(batched_rate / sequential_rate, 2),
                "identical_texts": same,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
