"""Throughput of the whole data stage on generated chat rows (10 % near duplicates, some PII).

    python benchmarks/data_throughput.py --rows 100000

Prints a final JSON line with rows, rows_per_s, wall_s and peak_rss_mb. Target on a 2-core machine:
<= 60 s and <= 2 GB for 100 000 rows, and 200 000 rows in <= 2.2x the time of 100 000.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from tuneloop.config import DataConfig
from tuneloop.data import prepare


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    vocab = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(30_000)})
    written: list[dict] = []
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            if written and rng.random() < 0.10:
                # A near duplicate: an earlier row with one word of its question changed.
                original = written[rng.randrange(len(written))]["messages"]
                words = original[0]["content"].split()
                words[rng.randrange(len(words))] = rng.choice(vocab)
                question, answer = " ".join(words), original[1]["content"]
            else:
                question = " ".join(rng.choices(vocab, k=rng.randint(60, 120)))
                if rng.random() < 0.05:
                    question += f" Reach me at user{i}@example.com or +1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}."
                answer = " ".join(rng.choices(vocab, k=rng.randint(15, 40)))
            row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            if len(written) < 5_000:
                written.append(row)
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--base-model", default=None,
        help="Also count every row's tokens with this model's tokenizer (e.g. smollm2-135m-instruct), as `tuneloop run` does.",
    )
    args = parser.parse_args()
    base = None
    if args.base_model:
        from tuneloop.config import RunConfig
        from tuneloop.models import resolve_base_model

        cache_dir = RunConfig.model_fields["cache_dir"].default.expanduser()  # the same cache `tuneloop run` uses
        base = resolve_base_model(args.base_model, cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "rows.jsonl"
        generate(src, args.rows)
        started = time.perf_counter()
        dataset = prepare(DataConfig(path=src, system_prompt="You are a helpful assistant."), Path(tmp) / "run", base)
        wall = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    print({k: v for k, v in dataset.counts.items() if k != "rejected_by_reason"}, file=sys.stderr)
    print(
        json.dumps(
            {
                "rows": args.rows,
                "rows_per_s": round(args.rows / wall),
                "wall_s": round(wall, 2),
                "peak_rss_mb": round(peak_kb / 1024),
                "tokenized": base is not None,
            }
        )
    )


if __name__ == "__main__":
    main()
