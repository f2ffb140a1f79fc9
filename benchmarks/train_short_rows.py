"""Training throughput on short rows: 4-row batches against batches filled to a token budget
(`train.batch_tokens`), same rows, model, recipe and number of epochs.

    python benchmarks/train_short_rows.py                    # 400 train rows, 2 epochs, budget 1024 tokens
    python benchmarks/train_short_rows.py --budget 2048 --epochs 1
    python benchmarks/train_short_rows.py --dropout-arm      # also 4-row batches with lora_dropout 0.05

The rows are a short-text classification: each ticket of the demo's data with its category as the answer
(no system prompt), 87 tokens a row on average with SmolLM2's chat template (which adds a default system
prompt). Each arm runs `tuneloop data` + `tuneloop train` in processes of its own on the default model with
the library defaults (bf16 autocast on a CPU that computes it natively). Tokens/s counts the rows' tokens
(packed batches hold no padding) per second of training, as the training loop measures it; the validation
loss is the loop's own at the end of the same number of epochs. Prints a JSON line per arm and a final JSON
line with both throughputs, their ratio and both validation losses. Targets: >= 300 tokens/s with the
budget, its validation loss <= the 4-row run's + 0.02.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ticket-triage"


def write_rows(path: Path) -> None:
    rows = []
    for line in (EXAMPLE / "data.jsonl").read_text().splitlines():
        ticket, answer = json.loads(line)["messages"][-2:]
        label = json.loads(answer["content"])["category"]
        rows.append({"messages": [ticket, {"role": "assistant", "content": label}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_arm(name: str, train: dict, work: Path) -> dict:
    config = {
        "name": name,
        "output_dir": str(work / name),
        "data": {"path": str(work / "rows.jsonl"), "val_fraction": 0.1, "test_fraction": 0.01, "seed": 0},
        "train": {"eval_steps": 10_000, "save_steps": 10_000, **train},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    for command in ("data", "train"):
        done = subprocess.run([sys.executable, "-m", "tuneloop", command, str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"tuneloop {command} ({name}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    meta = json.loads((work / name / "train" / "meta.json").read_text())
    rows = json.loads((work / name / "data" / "meta.json").read_text())["counts"]["train"]
    return {
        "arm": name,
        "rows_per_step": meta["params"]["batch_size"],
        "steps": max((h["step"] for h in meta["history"] if "step" in h), default=None),
        "train_rows": rows,
        "mean_row_tokens": round(meta["train_tokens"] / (rows * train["epochs"]), 1),
        "train_seconds": meta["train_seconds"],
        "tokens_per_s": round(meta["train_tokens"] / meta["train_seconds"], 1),
        "val_loss": round(meta["val_loss"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--dropout-arm", action="store_true",
                        help="also run 4-row batches with lora_dropout 0.05 (the default before 0), for its cost")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="short-rows-"))
    try:
        write_rows(work / "rows.jsonl")
        rows = run_arm("rows4", {"batch_size": 4, "epochs": args.epochs}, work)
        print(json.dumps(rows), flush=True)
        budget = run_arm("budget", {"batch_size": 4, "batch_tokens": args.budget, "epochs": args.epochs}, work)
        print(json.dumps(budget), flush=True)
        dropout = None
        if args.dropout_arm:
            dropout = run_arm("rows4-dropout", {"batch_size": 4, "lora_dropout": 0.05, "epochs": args.epochs}, work)
            print(json.dumps(dropout), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "epochs": args.epochs,
        "budget_tokens": args.budget,
        "rows4_tokens_per_s": rows["tokens_per_s"],
        "budget_tokens_per_s": budget["tokens_per_s"],
        "ratio": round(budget["tokens_per_s"] / rows["tokens_per_s"], 2),
        "rows4_val_loss": rows["val_loss"],
        "budget_val_loss": budget["val_loss"],
        "val_loss_within_0.02": budget["val_loss"] <= rows["val_loss"] + 0.02,
        "meets_300_tokens_per_s": budget["tokens_per_s"] >= 300,
        **({"rows4_dropout_tokens_per_s": dropout["tokens_per_s"], "rows4_dropout_val_loss": dropout["val_loss"]}
           if dropout else {}),
    }))


if __name__ == "__main__":
    main()
