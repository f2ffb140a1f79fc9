"""How the training process's memory grows over a run: the demo config trained for 80 steps, RSS and
its high-water mark read every 10 steps, with the allocator as it is or with one of two glibc settings.

    python benchmarks/train_memory_growth.py                  # glibc defaults
    python benchmarks/train_memory_growth.py --malloc trim    # malloc_trim(0) after every step
    python benchmarks/train_memory_growth.py --malloc fixed   # mmap threshold fixed at 256 KiB (mallopt)

Run one at a time, alone on the machine. Prints a JSON line every 10 steps and a final JSON line with the
last RSS, the peak (VmHWM) and the training seconds. Explains why `tuneloop plan`'s short probe sees a
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
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    libc = ctypes.CDLL("libc.so.6")
    if args.malloc == "fixed":
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD: fixed, so freed buffers go back to the system
        libc.mallopt(-1, 1024 * 1024)  # M_TRIM_THRESHOLD

    from tuneloop import pipeline
    from tuneloop.config import load_config

    out = Path(tempfile.mkdtemp(prefix="memory-growth-"))
    cfg = load_config(ROOT / "examples" / "ticket-triage" / "config.yaml",
                      [f"train.max_steps={args.steps}", f"train.eval_steps={args.steps // 2}", f"output_dir={out}"])
    data, _ = pipeline.prepare_data(cfg)
    started = time.time()

    def on_log(step: int, total: int, logs: dict) -> None:
        if args.malloc == "trim":
            libc.malloc_trim(0)
        if step % 10 == 0 and "eval_loss" not in logs:
            rss, peak = memory_mb()
            print(json.dumps({"step": step, "rss_mb": rss, "peak_mb": peak, "seconds": round(time.time() - started, 1)}),
                  flush=True)

    adapter = pipeline.train_adapter(cfg, data, on_log=on_log)
    rss, peak = memory_mb()
    print(json.dumps({"malloc": args.malloc, "steps": args.steps, "rss_mb": rss, "peak_mb": peak,
                      "train_seconds": adapter.train_seconds}))


if __name__ == "__main__":
    main()
