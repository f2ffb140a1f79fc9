"""How close `tuneloop plan` comes to the run it plans: predicted training seconds against the training
loop's own measured time (`train_seconds` in the adapter's meta.json), and predicted peak memory against
the training process's peak RSS.

    python benchmarks/plan_accuracy.py                      # the demo, the demo at 3 epochs, the 256 long chats
    python benchmarks/plan_accuracy.py --cases demo         # one of them

Each case runs `tuneloop plan` and then `tuneloop data` + `tuneloop train` (no evaluation) in processes of
their own, so the peak RSS is the training process's alone. Prints a JSON line per case and a final JSON
line with every case's time and memory ratios (predicted / measured). Targets: time within +-25 %, memory
within +-20 %. Rerun it after any change to training speed or to the defaults.
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


def case_config(name: str, work: Path) -> Path:
    config = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    config["data"]["path"] = str(EXAMPLE / "data.jsonl")
    config["data"]["answer_schema"] = str(EXAMPLE / "schema.json")
    if name == "demo":  # the demo as it was when these cases were defined: 64 steps, validation every 32
        config["train"].update(max_steps=64, eval_steps=32)
    elif name == "demo-3-epochs":
        config["train"].pop("max_steps")
        config["train"].pop("eval_steps")
        config["train"]["epochs"] = 3
    elif name == "long-chats":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from train_throughput import make_rows  # the training benchmark's 256 long multi-turn chats

        rows = work / "long.jsonl"
        rows.write_text("".join(json.dumps(row) + "\n" for row in make_rows(320, seed=0)))
        config["data"] = {"path": str(rows), "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0}
        config["train"] = {"epochs": 1, "batch_size": 4}
    config["name"] = name
    config["output_dir"] = str(work / "run")
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


MEASURE = """
import resource, runpy, sys
sys.argv = ["tuneloop", *sys.argv[1:]]
try:
    runpy.run_module("tuneloop", run_name="__main__")
finally:
    print(f"PEAK_RSS_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


def tuneloop(*args: str, cwd: Path) -> float:
    """Run the CLI in a process of its own; that process's peak RSS in MB."""
    done = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"tuneloop {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    line = [x for x in done.stderr.splitlines() if x.startswith("PEAK_RSS_KB=")][-1]
    return int(line.split("=")[1]) / 1024


def run_case(name: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"plan-{name}-"))
    try:
        config = case_config(name, work)
        tuneloop("plan", str(config), cwd=work)
        plan = json.loads((work / "run" / "plan.json").read_text())
        tuneloop("data", str(config), cwd=work)
        peak = tuneloop("train", str(config), cwd=work)
        measured = json.loads((work / "run" / "train" / "meta.json").read_text())["train_seconds"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "case": name,
        "steps": plan["steps"],
        "predicted_train_seconds": plan["train_seconds"],
        "measured_train_seconds": measured,
        "time_ratio": round(plan["train_seconds"] / measured, 3),
        "predicted_peak_memory_mb": plan["peak_memory_mb"],
        "measured_peak_rss_mb": round(peak),
        "memory_ratio": round(plan["peak_memory_mb"] / peak, 3),
        "probe_steps": plan["probe"]["steps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["demo", "demo-3-epochs", "long-chats"],
                        choices=["demo", "demo-3-epochs", "long-chats"])
    args = parser.parse_args()
    results = []
    for name in args.cases:
        results.append(run_case(name))
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({
        "cases": [r["case"] for r in results],
        "time_ratios": [r["time_ratio"] for r in results],
        "memory_ratios": [r["memory_ratio"] for r in results],
        "time_within_25pct": all(0.75 <= r["time_ratio"] <= 1.25 for r in results),
        "memory_within_20pct": all(0.8 <= r["memory_ratio"] <= 1.2 for r in results),
    }))


if __name__ == "__main__":
    main()
