"""Training throughput: vanilla TRL SFTTrainer + PEFT against `tuneloop train`, same model, rows and recipe.

    python benchmarks/train_throughput.py            # 256 train rows, 1 epoch, SmolLM2-135M-Instruct

Both arms train the same LoRA (r 16, alpha 32, dropout 0.05, all linear layers) with the same learning
rate, schedule, batch size, epochs and maximum length on the same chat rows (multi-turn support tickets
with a realistic spread of lengths). TRL keeps its own defaults for everything else (padded batches,
activation checkpointing, bf16 autocast on CPU, full-vocabulary logits). Each arm runs in its own
process so its peak RSS is its own. Real tokens/s counts the rows' tokens (no padding) per second of
`trainer.train()`. Both adapters are then scored by the same function: mean completion-token
cross-entropy on held-out rows, in fp32. Prints a final JSON line with trl_tokens_per_s,
tuneloop_tokens_per_s, ratio, trl_peak_rss_mb, tuneloop_peak_rss_mb, trl_val_loss and tuneloop_val_loss.
Target on a 2-core CPU: ratio >= 3, tuneloop RSS <= 0.6x TRL's, val loss <= TRL's + 0.02.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ticket-triage"
RECIPE = {"learning_rate": 2e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.1, "batch_size": 4, "max_seq_length": 1024}
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def make_rows(count: int, seed: int) -> list[dict]:
    """Support-ticket chats: the system prompt, 0-6 earlier exchanges (most chats have none), then the
    ticket and its JSON answer, which is the trained completion."""
    import yaml

    system = yaml.safe_load((EXAMPLE / "config.yaml").read_text())["data"]["system_prompt"]
    pool = [json.loads(line)["messages"] for line in (EXAMPLE / "data.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        history = []
        for _ in range(rng.choices([0, 1, 2, 4, 6], weights=[50, 25, 12, 8, 5])[0]):
            history += rng.choice(pool)
        rows.append({"messages": [{"role": "system", "content": system}, *history, *rng.choice(pool)]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def row_tokens(tokenizer, rows: list[dict]) -> int:
    return sum(len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows)


def run_trl(base_dir: Path, train_path: Path, out: Path, epochs: float) -> float:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    rows = [json.loads(line)["messages"] for line in train_path.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])
    args = SFTConfig(
        output_dir=str(out),
        use_cpu=not torch.cuda.is_available(),  # the one setting TRL refuses to run without on a CPU
        per_device_train_batch_size=RECIPE["batch_size"],
        learning_rate=RECIPE["learning_rate"],
        lr_scheduler_type=RECIPE["lr_scheduler"],
        warmup_steps=RECIPE["warmup_ratio"],
        num_train_epochs=epochs,
        max_length=RECIPE["max_seq_length"],
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    lora = LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_dir), args=args, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(base_dir), peft_config=lora,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_model(str(out / "adapter"))
    return seconds


def run_tuneloop(base_dir: Path, train_path: Path, out: Path, epochs: float) -> float:
    from tuneloop.artifacts import BaseModelRef, Dataset
    from tuneloop.config import TrainConfig
    from tuneloop.train import train

    cfg = TrainConfig(epochs=epochs, seed=0, save_steps=10**6, **RECIPE, **LORA)
    data = Dataset(dir=out, train=train_path, val=train_path, test=train_path, hash="bench", split_hashes={},
                   counts={"val": 0})  # no validation during training: both arms are timed on training alone
    adapter = train(cfg, data, BaseModelRef("bench", base_dir), out)
    return adapter.train_seconds


def val_loss(base_dir: Path, adapter_dir: Path, val_path: Path) -> float:
    """Mean cross-entropy over every completion token of the held-out rows, fp32, one row at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.train.template import IGNORE, encode_example

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for line in val_path.read_text().splitlines():
            example = encode_example(tokenizer, json.loads(line)["messages"], RECIPE["max_seq_length"])
            labels = torch.tensor([example.labels])
            logits = model(input_ids=torch.tensor([example.input_ids])).logits.float()
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], targets[0], ignore_index=IGNORE, reduction="sum")
            total, count = total + loss.item(), count + int((targets != IGNORE).sum())
    return total / count


def child(arm: str, base_dir: Path, work: Path, epochs: float) -> None:
    runner = run_trl if arm == "trl" else run_tuneloop
    seconds = runner(base_dir, work / "train.jsonl", work / arm, epochs)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--val-rows", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tuneloop-train-bench"))
    parser.add_argument("--arm", choices=["trl", "tuneloop"], help=argparse.SUPPRESS)  # internal: one arm
    args = parser.parse_args()

    from tuneloop.config import RunConfig
    from tuneloop.models import resolve_base_model

    base = resolve_base_model(args.base_model, RunConfig.model_fields["cache_dir"].default.expanduser())
    if args.arm:
        return child(args.arm, Path(base.path), args.workdir, args.epochs)

    from transformers import AutoTokenizer

    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = make_rows(args.rows + args.val_rows, seed=0)
    write_jsonl(args.workdir / "train.jsonl", rows[: args.rows])
    write_jsonl(args.workdir / "val.jsonl", rows[args.rows :])
    tokens = row_tokens(AutoTokenizer.from_pretrained(base.path), rows[: args.rows]) * args.epochs
    result: dict[str, float] = {"rows": args.rows, "epochs": args.epochs, "tokens": tokens}
    for arm in ("trl", "tuneloop"):
        command = [sys.executable, __file__, "--arm", arm, "--epochs", str(args.epochs),
                   "--base-model", args.base_model, "--workdir", str(args.workdir)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        adapter = args.workdir / arm / ("train/adapter" if arm == "tuneloop" else "adapter")
        result[f"{arm}_seconds"] = round(figures["seconds"], 1)
        result[f"{arm}_tokens_per_s"] = round(tokens / figures["seconds"], 1)
        result[f"{arm}_peak_rss_mb"] = round(figures["peak_rss_mb"])
        result[f"{arm}_val_loss"] = round(val_loss(Path(base.path), adapter, args.workdir / "val.jsonl"), 4)
        print(json.dumps({arm: {k: v for k, v in result.items() if k.startswith(arm)}}), flush=True)
    result["ratio"] = round(result["tuneloop_tokens_per_s"] / result["trl_tokens_per_s"], 2)
    result["rss_ratio"] = round(result["tuneloop_peak_rss_mb"] / result["trl_peak_rss_mb"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
