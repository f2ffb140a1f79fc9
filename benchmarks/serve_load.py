"""Serving under concurrent load: `tuneloop serve` against `transformers serve --continuous-batching`, on
the same weights (the bundled SmolLM2-135M-Instruct directory), in the same dtype (`--dtype`), with the same
torch threads.

    python benchmarks/serve_load.py --clients 16 --requests 8 --max-tokens 48 --runs 3 --adapters 4

Each server is started in turn on a free loopback port and warmed up with one round of concurrent requests
(every served model included). Then `--clients` concurrent `openai` clients each send `--requests` chat
requests one after another: the ticket-triage system prompt and user messages, greedy, `max_tokens` as given,
the same requests to both servers. Per run: requests/s over the wall time of the load, p95 latency, generated
tokens/s and the completion tokens the server reported; each figure is the median of `--runs` runs. Both
servers should generate about the same tokens for the same requests (within 5 %); their ratio is reported.
The peer runs as `transformers serve MODEL_DIR --continuous-batching --device cpu --dtype DTYPE`, and its
requests name MODEL_DIR as their model.

With `--adapters K`, tuneloop is started once more with K LoRA adapters (r 16, all linear layers, small random
weights) registered in its registry, and the requests go round-robin to the base model and the K adapters:
`mixed_req_per_s`, and `mixed_ratio` against the single-model requests/s.

With `--log`, tuneloop is measured twice on the base model: with its request log (`monitor.sample_rate` 1.0,
personal data redacted) and without (`monitor.log_requests: false`), both servers up at once and their runs
taken in turn, each the median of `--runs`: `log_req_per_s`, `nolog_req_per_s`, `log_ratio`, and `log_rows` against `log_rows_expected` (every
request sent, warm-up included, must be in the log).
Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

import demo_prompts  # noqa: E402  (beside this script)
from tuneloop.config import DEFAULT_BASE_MODEL, RunConfig, ServeConfig, load_config
from tuneloop.models import resolve_base_model

HOST = "127.0.0.1"
LORA_B_STD = 0.02  # small enough that the adapters still answer in words, large enough that they answer differently


# --- servers ---------------------------------------------------------------------------------------------


def count_logged(project: Path) -> int:
    """Rows in the request log `tuneloop serve` wrote in `project` (its default SQLite file)."""
    import sqlite3

    with sqlite3.connect(project / "runs" / "serve-load" / "requests.db") as connection:
        return connection.execute("select count(*) from requests").fetchone()[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def server_env(threads: int) -> dict[str, str]:
    """The same thread count for both servers (torch reads OMP_NUM_THREADS at start), and no hub lookups."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


@contextlib.contextmanager
def running(command: list[str], cwd: Path, env: dict[str, str], port: int, timeout: float) -> Iterator[str]:
    """Start `command`, a server listening on `port`, in a process group of its own; yield its base URL once
    /health answers; stop the whole group afterwards, also on errors and interrupts."""
    log_path = cwd / f"server-{port}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_healthy(process, port, timeout, log_path)
        yield f"http://{HOST}:{port}/v1"
    finally:
        _stop(process)


def _wait_until_healthy(process: subprocess.Popen, port: int, timeout: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{' '.join(process.args)} exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(1)
    sys.exit(f"{' '.join(process.args)}: no answer on /health after {timeout:.0f} s:\n{_tail(log_path)}")


def _stop(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return  # the group is gone already
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def write_project(project: Path, port: int, threads: int, dtype: str, log: bool | None = None) -> None:
    """A project directory for `tuneloop serve`: a config on the bundled base model; ./mlruns is its registry.
    `log`: request log on (sample rate 1.0, personal data redacted) or off; None: the version's default."""
    project.mkdir(parents=True, exist_ok=True)
    serve = {"port": port}
    if "threads" in ServeConfig.model_fields:  # the batching server's own setting; the older server has none
        serve["threads"] = threads
    if "dtype" in ServeConfig.model_fields:
        serve["dtype"] = dtype
    data = load_config(demo_prompts.EXAMPLE).data.path  # serving reads no data, but a config names some
    config = {"name": "serve-load", "base_model": DEFAULT_BASE_MODEL, "data": {"path": str(data)}, "serve": serve}
    if log is not None:
        config["monitor"] = {"log_requests": log, "sample_rate": 1.0, "pii": "redact"}
    (project / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


def tuneloop_server(project: Path, threads: int, dtype: str, timeout: float, log: bool | None = None):
    port = free_port()
    write_project(project, port, threads, dtype, log)
    command = [sys.executable, "-m", "tuneloop", "serve", "config.yaml"]  # `tuneloop serve` of this interpreter
    return running(command, project, server_env(threads), port, timeout)


def peer_command(model_dir: Path, port: int, dtype: str) -> list[str]:
    """`transformers serve` pinned to the local model directory; requests must name that same path."""
    cli = Path(sys.executable).with_name("transformers")
    executable = str(cli) if cli.is_file() else shutil.which("transformers") or sys.exit("transformers CLI not found")
    return [
        executable, "serve", str(model_dir), "--continuous-batching", "--device", "cpu", "--dtype", dtype,
        "--host", HOST, "--port", str(port), "--log-level", "warning",
    ]


def peer_server(model_dir: Path, workdir: Path, threads: int, dtype: str, timeout: float):
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    return running(peer_command(model_dir, port, dtype), workdir, server_env(threads), port, timeout)


# --- adapters --------------------------------------------------------------------------------------------


def make_adapters(project: Path, base, count: int) -> list[str]:
    """`count` LoRA adapters on `base` with small random weights, registered in `project`'s registry as
    bench-lora-1 ... bench-lora-`count` (the names `tuneloop serve` answers to)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneloop.artifacts import Adapter, Dataset, EvalReport
    from tuneloop.models import load_model
    from tuneloop.registry import register

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # as `tuneloop` itself sets it
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(load_model(base), lora)
    cfg = load_config(project / "config.yaml")
    path = cfg.data.path
    data = Dataset(dir=project, train=path, val=path, test=path, hash="serve-load", split_hashes={}, counts={})
    report = EvalReport(project, rows=0, baseline={}, candidate={})
    names = []
    for index in range(1, count + 1):
        torch.manual_seed(index)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.normal_(0.0, param.shape[1] ** -0.5)  # (r, in)
                elif "lora_B" in name:
                    param.normal_(0.0, LORA_B_STD)  # (out, r)
        directory = project / "adapters" / f"bench-lora-{index}"
        model.save_pretrained(directory)
        adapter = Adapter(
            dir=directory, base_model=base.name, dataset_hash=data.hash, method="lora",
            params={"r": 16, "lora_alpha": 32}, history=[], train_loss=0.0, val_loss=None, train_tokens=0,
            train_seconds=0.0,
        )
        with contextlib.chdir(project):  # the default registry is ./mlruns
            version = register(cfg.registry, directory.name, adapter, report, data, cfg.model_dump(mode="json"))
        names.append(version.name)
    return names


# --- load ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    index: int  # which request: client * requests + its number
    latency_s: float
    completion_tokens: int
    text: str
    finish_reason: str


@dataclass(frozen=True)
class Run:
    wall_s: float
    answers: list[Answer]
    errors: list[str]
    health_max_s: float  # the slowest /health answer while the load ran
    metrics_match: bool | None  # /metrics counters moved by exactly what the clients got; None: no /metrics

    def figures(self) -> dict[str, float]:
        latencies = sorted(a.latency_s for a in self.answers)
        tokens = sum(a.completion_tokens for a in self.answers)
        return {
            "health_max_s": self.health_max_s,
            "req_per_s": len(self.answers) / self.wall_s,
            "p95_s": _percentile(latencies, 0.95),
            "gen_tokens_per_s": tokens / self.wall_s,
            "completion_tokens": tokens,
            "stop_answers": sum(a.finish_reason == "stop" for a in self.answers),
            "wall_s": self.wall_s,
        }


def _percentile(ordered: list[float], share: float) -> float:
    if not ordered:
        return float("nan")
    position = share * (len(ordered) - 1)
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def load(base_url: str, models: list[str], prompts: list, args: argparse.Namespace) -> Run:
    """`args.clients` clients at once, each sending `args.requests` requests one after another; client c's
    r-th request goes to models[(c + r) % len(models)], so the models are mixed at every moment."""
    from openai import AsyncOpenAI

    answers: list[Answer] = []
    errors: list[str] = []

    async def client(number: int) -> None:
        async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=args.request_timeout) as api:
            for step in range(args.requests):
                index = number * args.requests + step
                start = time.perf_counter()
                try:
                    reply = await api.chat.completions.create(
                        model=models[(number + step) % len(models)],
                        messages=prompts[index % len(prompts)],
                        temperature=0,
                        max_tokens=args.max_tokens,
                    )
                except Exception as err:  # a failed request is counted, the load goes on
                    errors.append(f"{type(err).__name__}: {err}"[:300])
                    continue
                choice = reply.choices[0]
                tokens = reply.usage.completion_tokens if reply.usage else 0
                latency = time.perf_counter() - start
                answers.append(Answer(index, latency, tokens, choice.message.content or "", choice.finish_reason))

    root = base_url.removesuffix("/v1")
    before = await scrape(root)
    # /health is timed from a process of its own: in this one, the clients' own work would be timed too.
    prober = await asyncio.create_subprocess_exec(sys.executable, "-c", PROBE, f"{root}/health",
                                                  stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    await prober.stdout.readline()  # its first answer: it is probing
    start = time.perf_counter()
    await asyncio.gather(*(client(number) for number in range(args.clients)))
    wall = time.perf_counter() - start
    health_max = float((await prober.communicate(b"stop\n"))[0].decode().split()[-1])
    after = await scrape(root)
    match = None
    if before is not None and after is not None:
        got = (len(answers), sum(a.completion_tokens for a in answers))
        match = got == (after[0] - before[0], after[1] - before[1])
    return Run(wall, sorted(answers, key=lambda a: a.index), errors, health_max, match)


PROBE = """
import sys, threading, time, httpx
stop, slowest = threading.Event(), 0.0
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
with httpx.Client(timeout=30) as http:
    while not stop.is_set():  # GET /health every 100 ms; prints the slowest answer, in seconds
        sent = time.perf_counter()
        http.get(sys.argv[1])
        took = time.perf_counter() - sent
        if slowest == 0.0:
            print("probing", took, flush=True)
        slowest = max(slowest, took)
        time.sleep(0.1)
print(slowest, flush=True)
"""


async def scrape(root: str) -> tuple[float, float] | None:
    """(requests answered, tokens generated) from the server's Prometheus /metrics, None where it has none."""
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(f"{root}/metrics")
    if response.status_code != 200 or "vllm:request_success_total" not in response.text:
        return None
    totals = {"vllm:request_success_total": 0.0, "vllm:generation_tokens_total": 0.0}
    for line in response.text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["vllm:request_success_total"], totals["vllm:generation_tokens_total"]


def warm_up(base_url: str, models: list[str], prompts: list, args: argparse.Namespace) -> None:
    """One request from every client at once, and at least one per served model, so that first-call costs
    (batch shapes, adapters, transformers' batching manager, which takes its sampling settings from its first
    request: greedy here too) stay out of the timed runs. Any failure here ends the benchmark."""
    round_ = argparse.Namespace(**{**vars(args), "clients": max(args.clients, len(models)), "requests": 1})
    run = asyncio.run(load(base_url, models, prompts, round_))
    if run.errors:
        sys.exit(f"{base_url}: warm-up failed: {run.errors[0]}")


def measure(label: str, base_url: str, models: list[str], prompts: list, args: argparse.Namespace,
            warm: bool = True) -> list[Run]:
    if warm:
        warm_up(base_url, models, prompts, args)
    runs = []
    for number in range(1, args.runs + 1):
        run = asyncio.run(load(base_url, models, prompts, args))
        f = run.figures()
        print(
            f"{label} run {number}: {f['req_per_s']:.2f} req/s, p95 {f['p95_s']:.2f} s, "
            f"{f['gen_tokens_per_s']:.1f} tokens/s, {f['completion_tokens']} tokens, {len(run.errors)} errors",
            file=sys.stderr,
        )
        for error in run.errors[:3]:
            print(f"  {error}", file=sys.stderr)
        runs.append(run)
    return runs


def alternate(first: tuple[str, str], second: tuple[str, str], models: list[str], prompts: list,
              args: argparse.Namespace) -> tuple[list[Run], list[Run]]:
    """`measure` for two servers, their runs taken in turn (first, second, first, ...) after both warm-ups."""
    for _, url in (first, second):
        warm_up(url, models, prompts, args)
    one_run = argparse.Namespace(**{**vars(args), "runs": 1})
    runs: tuple[list[Run], list[Run]] = ([], [])
    for _ in range(args.runs):
        for (label, url), kept in zip((first, second), runs):
            kept += measure(label, url, models, prompts, one_run, warm=False)
    return runs


def summary(runs: list[Run] | None) -> dict[str, float | None]:
    """The median of each figure over the runs; errors summed."""
    if runs is None:
        keys = ("health_max_s", "req_per_s", "p95_s", "gen_tokens_per_s", "completion_tokens", "stop_answers")
        return dict.fromkeys(keys) | {"errors": 0}
    figures = [run.figures() for run in runs]
    medians = {key: statistics.median(f[key] for f in figures) for key in figures[0]}
    return {**medians, "errors": sum(len(run.errors) for run in runs)}


# --- report ----------------------------------------------------------------------------------------------


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def report(args, threads: int, ours: list[Run], mixed: list[Run] | None, peer: list[Run] | None) -> dict:
    t, m, p = summary(ours), summary(mixed), summary(peer)
    token_ratio = t["completion_tokens"] / p["completion_tokens"] if peer and p["completion_tokens"] else None
    same = None
    if peer:  # greedy on the same weights: most answers should match word for word
        theirs = {a.index: a.text for a in peer[0].answers}
        same = sum(theirs.get(a.index) == a.text for a in ours[0].answers)
    result = {
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "runs": args.runs, "threads": threads, "dtype": args.dtype,
        "tuneloop_req_per_s": _round(t["req_per_s"], 3),
        "peer_req_per_s": _round(p["req_per_s"], 3),
        "ratio": _round(t["req_per_s"] / p["req_per_s"], 2) if peer else None,
        "tuneloop_p95_s": _round(t["p95_s"], 3),
        "peer_p95_s": _round(p["p95_s"], 3),
        "tuneloop_gen_tokens_per_s": _round(t["gen_tokens_per_s"], 1),
        "peer_gen_tokens_per_s": _round(p["gen_tokens_per_s"], 1),
        "tuneloop_completion_tokens": t["completion_tokens"],
        "peer_completion_tokens": p["completion_tokens"],
        "completion_tokens_ratio": _round(token_ratio, 3),
        "completion_tokens_within_5pct": None if token_ratio is None else abs(token_ratio - 1) <= 0.05,
        # transformers counts the end-of-turn token of an answer that stops, tuneloop does not
        "tuneloop_stop_answers": t["stop_answers"], "peer_stop_answers": p["stop_answers"],
        "identical_answers": same,
        "tuneloop_errors": t["errors"], "peer_errors": p["errors"],
        "errors": t["errors"] + p["errors"] + m["errors"],
        # the slowest /health answer during any tuneloop run, and whether /metrics added up in every one
        "tuneloop_health_max_ms": round(1000 * max(r.health_max_s for r in [*ours, *(mixed or [])]), 1),
        "tuneloop_metrics_match": all(r.metrics_match for r in [*ours, *(mixed or [])]),
        "tuneloop_runs_req_per_s": [round(r.figures()["req_per_s"], 3) for r in ours],
        "peer_runs_req_per_s": [round(r.figures()["req_per_s"], 3) for r in peer] if peer else None,
    }
    if mixed is not None:
        result |= {
            "adapters": args.adapters,
            "mixed_req_per_s": _round(m["req_per_s"], 3),
            "mixed_ratio": _round(m["req_per_s"] / t["req_per_s"], 2),
            "mixed_p95_s": _round(m["p95_s"], 3),
            "mixed_gen_tokens_per_s": _round(m["gen_tokens_per_s"], 1),
            "mixed_completion_tokens": m["completion_tokens"],
            "mixed_errors": m["errors"],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=0, help="also a run spread over K adapters + the base")
    parser.add_argument("--skip-peer", action="store_true", help="do not run transformers serve")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of both servers")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="of both servers")
    parser.add_argument("--log", action="store_true", help="also measure with the request log on and off")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the servers are stopped on a kill too

    cache_dir = RunConfig.model_fields["cache_dir"].default.expanduser()  # the same cache `tuneloop serve` uses
    base = resolve_base_model(DEFAULT_BASE_MODEL, cache_dir)
    prompts = demo_prompts.chat_prompts()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        single_project, mixed_project = Path(tmp) / "single", Path(tmp) / "mixed"
        if args.log:  # both servers up at once, runs alternating, so drift over time hits both alike
            with tuneloop_server(single_project, args.threads, args.dtype, args.startup_timeout, True) as url, \
                    tuneloop_server(Path(tmp) / "nolog", args.threads, args.dtype, args.startup_timeout, False) as off:
                ours, unlogged = alternate(("request log on", url), ("request log off", off), [base.name], prompts, args)
            log_rows = count_logged(single_project)
        else:
            unlogged = None
            with tuneloop_server(single_project, args.threads, args.dtype, args.startup_timeout) as url:
                ours = measure("tuneloop", url, [base.name], prompts, args)
        mixed = None
        if args.adapters:
            write_project(mixed_project, free_port(), args.threads, args.dtype)
            models = [base.name, *make_adapters(mixed_project, base, args.adapters)]
            with tuneloop_server(mixed_project, args.threads, args.dtype, args.startup_timeout) as url:
                mixed = measure(f"tuneloop, {args.adapters} adapters + base", url, models, prompts, args)
        peer = None
        if not args.skip_peer:
            with peer_server(base.path, Path(tmp) / "peer", args.threads, args.dtype, args.startup_timeout) as url:
                peer = measure("transformers serve", url, [str(base.path)], prompts, args)
    result = report(args, args.threads, ours, mixed, peer)
    if unlogged is not None:
        on, off = summary(ours)["req_per_s"], summary(unlogged)["req_per_s"]
        result |= {
            "log_req_per_s": _round(on, 3), "nolog_req_per_s": _round(off, 3), "log_ratio": _round(on / off, 3),
            "log_within_5pct": on >= 0.95 * off, "nolog_errors": summary(unlogged)["errors"],
            "log_rows": log_rows, "log_rows_expected": args.clients * (1 + args.runs * args.requests),
        }
    if result["completion_tokens_within_5pct"] is False:
        ratio = result["completion_tokens_ratio"]
        print(f"warning: the servers' completion tokens differ by more than 5 % (ratio {ratio})", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
