"""How the training process's memory grows over a run: the demo config trained for 80 steps, RSS and
its high-water mark read every 10 steps, with the allocator as it is or with one of two glibc settings.

    python benchmarks/train_memory_growth.py                  # glibc defaults
    python benchmarks/train_memory_growth.py --malloc trim    # malloc_trim(0) after every step
    python benchmarks/train_memory_growth.py --malloc fixed   # mmap threshold fixed at 256 KiB (mallopt)
    python benchmarks/train_memory_growth.py --malloc fixed --mmap-kib 4096 --every 1

Run one at a time, alone on the machine. Prints a JSON line every 10 steps (--every) with the step's
input tokens, RSS and peak, and a final JSON line with the last RSS, the peak (VmHWM) and the training seconds. Explains why `tuneloop plan`'s short probe sees a
lower peak than a long run reaches (benchmarks/RESULTS.md, plan accuracy).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def memory_mb() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text().splitlines()
    read = lambda key: int(next(line for line in status if line.startswith(key)).split()[1]) // 1024  # noqa: E731
    return read("VmRSS:"), read("VmHWM:")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--malloc", choices=["default", "trim", "fixed"], default="default")
    parser.add_argument("--mmap-kib", type=int, default=256, help="with --malloc fixed: the mmap threshold")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--every", type=int, default=10, help="read the memory every this many steps")
    args = parser.parse_args()
    libc = ctypes.CDLL("libc.so.6")
    if args.malloc == "fixed":
        libc.mallopt(-3, args.mmap_kib * 1024)  # M_MMAP_THRESHOLD: fixed, so freed buffers go back to the system
        libc.mallopt(-1, 4 * args.mmap_kib * 1024)  # M_TRIM_THRESHOLD

    from tuneloop import pipeline
    from tuneloop.config import load_config

    out = Path(tempfile.mkdtemp(prefix="memory-growth-"))
    cfg = load_config(ROOT / "examples" / "ticket-triage" / "config.yaml",
                      [f"train.max_steps={args.steps}", f"train.eval_steps={args.steps // 2}", f"output_dir={out}"])
    data, _ = pipeline.prepare_data(cfg)
    started = time.time()

    seen = [0]

    def on_log(step: int, total: int, logs: dict) -> None:
        if args.malloc == "trim":
            libc.malloc_trim(0)
        if "loss" not in logs:  # a validation, or a checkpoint saved
            return
        tokens = int(float(logs.get("num_input_tokens_seen", 0)))
        step_tokens, seen[0] = tokens - seen[0], tokens
        if step % args.every == 0:
            rss, peak = memory_mb()
            print(json.dumps({"step": step, "step_tokens": step_tokens, "rss_mb": rss, "peak_mb": peak,
                              "seconds": round(time.time() - started, 1)}), flush=True)

    adapter = pipeline.train_adapter(cfg, data, on_log=on_log)
    rss, peak = memory_mb()
    print(json.dumps({"malloc": args.malloc, "steps": args.steps, "rss_mb": rss, "peak_mb": peak,
                      "train_seconds": adapter.train_seconds}))


if __name__ == "__main__":
    main()
