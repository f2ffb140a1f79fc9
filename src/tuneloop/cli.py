"""The `tuneloop` command: one short command per stage, plus `run` for the whole loop."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Literal

import typer
from rich.console import Console

from tuneloop.errors import TuneloopError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
registry_app = typer.Typer(no_args_is_help=True, help="Registered model versions (MLflow).")
app.add_typer(registry_app, name="registry")
feedback_app = typer.Typer(no_args_is_help=True, help="Ratings and corrections of served answers.")
app.add_typer(feedback_app, name="feedback")
console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="The run's YAML config.", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config value: section.key=value.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]


def _quiet_libraries() -> None:
    """Our own progress bars and tables replace the libraries' per-call bars and info logs."""
    import logging
    import os
    import warnings

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="(transformers|peft|trl)")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def user_errors(command: Callable) -> Callable:
    """Print a user-caused error as one line and exit non-zero; `--debug` keeps the traceback."""

    @functools.wraps(command)
    def wrapper(*args, debug: bool = False, **kwargs):
        _quiet_libraries()
        try:
            return command(*args, **kwargs)
        except TuneloopError as err:
            if debug:
                raise
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _load(config: Path, overrides: list[str] | None):
    from tuneloop.config import load_config

    return load_config(config, overrides)


def _base(cfg):
    from tuneloop.pipeline import resolve_base

    return resolve_base(cfg)


@app.command()
@user_errors
def run(
    config: ConfigArg,
    set: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Train even when a baseline reaches eval.target.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Whole loop: data -> baseline eval -> LoRA training -> eval -> report -> registry."""
    from tuneloop import pipeline

    cfg = _load(config, set)
    try:
        result = pipeline.run(cfg, progress=console.print, force=force)
    except pipeline.FineTuningNotNeeded as stop:
        console.print(f"[bold]{stop.verdict['reason']}[/]; nothing was trained (--force trains anyway). "
                      f"Baseline answers: {stop.report.dir}")
        raise typer.Exit(5) from None
    _print_report(result.report)
    console.print(f"results: {cfg.run_dir.resolve()}  (report.md, eval_report.html, loss.png, metrics.png)")
    if result.version is None:
        raise typer.Exit(3)  # refused by the gate: not registered, so never served
    console.print(f"registered [bold]{result.version.name}[/] version {result.version.version}")


@app.command()
@user_errors
def plan(config: ConfigArg, set: SetOpt = None, debug: DebugOpt = False) -> None:
    """Before training: tokens, time and memory (measured here by a short probe, estimated for common GPUs),
    costs against an API, and whether a baseline already reaches eval.target. Writes plan.json."""
    from rich.table import Table

    from tuneloop import pipeline

    cfg = _load(config, set)
    result = pipeline.plan(cfg, progress=console.print)
    console.print(f"data: {result['rows']['train']} train rows, {result['train_tokens']} tokens "
                  f"({result['trained_tokens']} trained), longest row {result['longest_row_tokens']} of "
                  f"{result['max_seq_length']} tokens; {result['steps']} steps, {result['epochs']} epochs")
    table = Table(title=f"training ({result['method']}, {result['trainable_parameters']:,} trained parameters)")
    for column in ("machine", "time", "cost $", *(f"{m} memory MB" for m in result["memory_mb"])):
        table.add_column(column, justify="left" if column == "machine" else "right")
    for machine, seconds in result["train_seconds_by_machine"].items():
        memory = [str(result["memory_mb"][m][machine] or "-") for m in result["memory_mb"]]
        cost = result["costs"]["training_usd"].get(machine)
        table.add_row(machine, _duration(seconds), "-" if cost is None else f"{cost:.2f}", *memory)
    console.print(table)
    console.print(f"this machine: {_duration(result['train_seconds'])} and {result['peak_memory_mb']} MB peak, "
                  f"measured by a {result['probe']['steps']}-step probe; {result['estimates']}")
    costs = result["costs"]
    if "self_hosting_usd_per_month" in costs:
        line = (f"serving {costs['requests_per_month']:,} requests/month yourself: "
                f"${costs['self_hosting_usd_per_month']:,.2f}/month on {costs['serving_machines']} machine(s)")
        if "api_usd_per_month" in costs:
            line += f"; the API: ${costs['api_usd_per_month']:,.2f}/month; break-even: {costs['break_even_months']}"
            line += "" if costs["break_even_months"] == "never" else " months"
        console.print(line)
    if result["baseline"] is not None:
        console.print(result["baseline"]["reason"])
    console.print(f"fine-tuning recommended: {'yes' if result['fine_tune_recommended'] else 'no'}  "
                  f"({cfg.run_dir.resolve() / 'plan.json'})")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


@app.command()
@user_errors
def data(config: ConfigArg, set: SetOpt = None, debug: DebugOpt = False) -> None:
    """Validate and split the examples into train/val/test."""
    from tuneloop import pipeline

    cfg = _load(config, set)
    dataset, _ = pipeline.prepare_data(cfg, progress=console.print)
    console.print(f"data: {dataset.dir.resolve()}")


@app.command()
@user_errors
def train(
    config: ConfigArg,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its newest checkpoint.")] = False,
    set: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Train a LoRA adapter on the prepared data."""
    import os

    from tuneloop import pipeline

    cfg = _load(config, set)
    adapter = pipeline.train_adapter(cfg, resume=resume)
    if "LOCAL_RANK" not in os.environ:  # inside a launch, the command that launched it reports
        console.print(f"adapter: {adapter.dir.resolve()}  (train loss {adapter.train_loss:.4f})")


@app.command(name="eval")
@user_errors
def eval_(
    config: ConfigArg,
    baseline_only: Annotated[bool, typer.Option(help="Score only the base model.")] = False,
    gate: Annotated[
        bool,
        typer.Option(help="Exit 3 unless the candidate beats every opponent (baselines, production) on every gate metric."),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            help="Evaluate this instead of the run's adapter: an adapter or full model directory, a registered "
            "version (registry:NAME/N or NAME-vN), or `endpoint` (the config's eval.endpoint)."
        ),
    ] = None,
    set: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Score the baselines and a candidate (default: the run's fine-tuned adapter) on the test split."""
    from tuneloop import pipeline

    if baseline_only and (gate or model):
        raise TuneloopError("--baseline-only scores no candidate: it cannot be combined with --gate or --model")
    cfg = _load(config, set)
    report = pipeline.evaluate_run(cfg, model=model, baseline_only=baseline_only, progress=console.print)
    _print_report(report)
    if report.html_report is not None:
        console.print(f"report: {report.html_report.resolve()}")
    if pipeline.gate_refusal(report, enforce=gate) is not None:
        raise typer.Exit(3)


@app.command()
@user_errors
def serve(
    config: ConfigArg,
    port: Annotated[int | None, typer.Option(help="Port (default: serve.port).")] = None,
    set: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """OpenAI-compatible server for the base model and every registered version of it."""
    from tuneloop import pipeline
    from tuneloop.registry import adapter_paths
    from tuneloop.serve import serve as serve_stage
    from tuneloop.serve.keys import load_api_keys

    cfg = _load(config, set)
    serve_cfg = cfg.serve if port is None else cfg.serve.model_copy(update={"port": port})
    base = _base(cfg)
    adapters = adapter_paths(cfg.registry, base.name)
    keys = load_api_keys(serve_cfg.api_keys, os.environ) if serve_cfg.api_keys else None
    console.print(f"serving {', '.join([base.name, *adapters])} on http://{serve_cfg.host}:{serve_cfg.port}/v1")
    if keys is None:
        console.print("no serve.api_keys: every client is let in (fine on 127.0.0.1, not on a shared network)")
    request_log = None
    if cfg.monitor.log_requests:
        request_log = pipeline.open_request_log(cfg)
        console.print(f"request log: {cfg.request_log_url} (sample rate {cfg.monitor.sample_rate:g}, "
                      f"personal data: {cfg.monitor.pii})")
    jobs = None
    if cfg.api.jobs:
        from tuneloop.jobs import jobs_api

        jobs = jobs_api(cfg, base.name)
        where = cfg.api.database_url.split("@")[-1] if cfg.api.database_url else cfg.jobs_dir
        console.print(f"fine-tuning jobs API: {where} ({cfg.api.workers} local worker(s))")
    serve_stage(serve_cfg, base, lambda: adapter_paths(cfg.registry, base.name), keys, request_log, jobs)


@app.command()
@user_errors
def worker(config: ConfigArg, set: SetOpt = None, debug: DebugOpt = False) -> None:
    """Take fine-tuning jobs from the queue of `tuneloop serve`'s jobs API (api.database_url) and train them."""
    import logging

    from tuneloop.jobs import work

    cfg = _load(config, set)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    work(cfg)


@registry_app.command("register")
@user_errors
def registry_register(config: ConfigArg, set: SetOpt = None, debug: DebugOpt = False) -> None:
    """Register the run's trained and evaluated adapter as a new version."""
    from tuneloop import pipeline

    cfg = _load(config, set)
    version = pipeline.register_adapter(cfg)
    console.print(f"registered [bold]{version.name}[/] version {version.version}")


@registry_app.command("list")
@user_errors
def registry_list(
    config: Annotated[Path | None, typer.Argument(help="A run config naming the registry (default: ./mlruns).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Registered versions with their headline metrics."""
    from rich.table import Table

    from tuneloop.config import RegistryConfig
    from tuneloop.registry import HEADLINE, list_versions

    registry_cfg = _load(config, None).registry if config else RegistryConfig()
    versions = list_versions(registry_cfg)
    if not versions:
        console.print("no registered versions yet; `tuneloop run CONFIG` registers one")
        return
    table = Table(title="registered versions")
    for column in ("model", "version", "base model", "dataset", *HEADLINE):
        table.add_column(column)
    for v in versions:
        metrics = [f"{v.metrics[m] * 100:.1f} %" if m in v.metrics else "-" for m in HEADLINE]
        table.add_row(v.name, str(v.version), v.base_model, v.dataset_hash[:12], *metrics)
    console.print(table)


ByOpt = Annotated[str | None, typer.Option("--by", help="Who moves the alias, for the history (default: the OS user).")]


@registry_app.command("promote")
@user_errors
def registry_promote(
    config: ConfigArg,
    version: Annotated[int, typer.Argument(help="The registered version to put in production.", show_default=False)],
    by: ByOpt = None,
    force: Annotated[bool, typer.Option(help="Promote a version whose gate failed or was not enforced.")] = False,
    set: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Give a version the `production` alias (the version the bare model name serves), once it loads."""
    from tuneloop import pipeline

    cfg = _load(config, set)
    moved = pipeline.promote_version(cfg, version, by or _os_user(), force=force)
    console.print(f"{cfg.model_name}: production {_move_text(moved)}", highlight=False)


@registry_app.command("rollback")
@user_errors
def registry_rollback(config: ConfigArg, by: ByOpt = None, set: SetOpt = None, debug: DebugOpt = False) -> None:
    """Give the `production` alias back to the version the latest promotion took it from."""
    from tuneloop import pipeline

    cfg = _load(config, set)
    moved = pipeline.rollback_version(cfg, by or _os_user())
    console.print(f"{cfg.model_name}: production {_move_text(moved)}", highlight=False)


@registry_app.command("history")
@user_errors
def registry_history(config: ConfigArg, set: SetOpt = None, debug: DebugOpt = False) -> None:
    """Every promotion and rollback of the model: when, who, from which version to which, its gate verdict."""
    from rich.table import Table

    from tuneloop.registry import history

    cfg = _load(config, set)
    entries = history(cfg.registry, cfg.model_name)
    if not entries:
        console.print(f"no promotions of {cfg.model_name} yet; `tuneloop registry promote CONFIG VERSION` makes one")
        return
    table = Table(title=f"{cfg.model_name}: production alias history")
    for column in ("when (UTC)", "who", "action", "from → to", "gate verdict", "forced"):
        table.add_column(column)
    for e in entries:
        moved = f"{'-' if e.from_version is None else f'v{e.from_version}'} → v{e.to_version}"
        table.add_row(e.when, e.who, e.action, moved, e.verdict, "yes" if e.forced else "")
    console.print(table)


@app.command()
@user_errors
def monitor(
    config: ConfigArg,
    since: Annotated[str, typer.Option(help="How far back to look: 30m, 24h, 7d.")] = "24h",
    set: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Live traffic per served version against the training data; exits 4 when an alert fires."""
    from tuneloop import pipeline
    from tuneloop.config import parse_duration

    try:
        parse_duration(since)
    except ValueError as err:
        raise TuneloopError(f"--since: {err}") from None
    cfg = _load(config, set)
    report = pipeline.monitor_traffic(cfg, since)
    _print_monitor(report)
    console.print(f"report: {report.html.resolve()}")
    if report.webhook_error:
        err_console.print(f"[yellow]alerts not delivered:[/] {report.webhook_error}", highlight=False)
    if report.alerts:
        raise typer.Exit(4)


@app.command()
@user_errors
def retrain(config: ConfigArg, set: SetOpt = None, debug: DebugOpt = False) -> None:
    """Train on the corrected answers since the last retrain; register and promote only past the gate.
    Exit codes: 0 promoted, 3 refused by the gate, 5 nothing new to train on, 1 error."""
    from tuneloop import pipeline

    cfg = _load(config, set)
    result = pipeline.retrain(cfg, progress=console.print)
    if result.report is not None:
        _print_report(result.report)
    if result.golden_report is not None:
        console.print("production golden set:")
        _print_report(result.golden_report)
    console.print(result.message, highlight=False)
    if result.outcome != "promoted":
        raise typer.Exit(5 if result.outcome == "nothing_new" else 3)


@app.command()
@user_errors
def synth(
    config: ConfigArg,
    n: Annotated[int, typer.Option("--n", min=1, help="New rows wanted in the review queue.")] = 100,
    set: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Grow the dataset: synth.teacher writes new rows like the training rows; those that pass the data
    stage's checks (and the judge's minimum) wait for `tuneloop review`. Exit 3 when fewer than --n pass."""
    from rich.table import Table

    from tuneloop import pipeline

    cfg = _load(config, set)
    result = pipeline.synth(cfg, n, progress=console.print)
    table = Table(title=f"synth: {result.requests} requests, {result.candidates} rows written")
    table.add_column("outcome")
    table.add_column("rows", justify="right")
    table.add_row("queued for review", str(result.queued))
    for kind, count in result.rejected.items():
        table.add_row(f"rejected: {kind}", str(count))
    if result.surplus:
        table.add_row("passed, beyond --n (not queued)", str(result.surplus))
    console.print(table)
    console.print(f"{result.message}  (each reject with its reason: {result.dir / 'rejects.jsonl'})", highlight=False)
    if result.queued < n:
        raise typer.Exit(3)


@app.command()
@user_errors
def review(
    config: ConfigArg,
    decisions: Annotated[
        Path | None, typer.Option(help="JSONL of {id, action: accept|edit|reject, answer, reason}; else ask here.")
    ] = None,
    reviewer: Annotated[str | None, typer.Option(help="Who reviews (default: the login name).")] = None,
    set: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Accept, edit or reject the synthetic rows waiting in the review queue; the reviewed rows become a
    new dataset version (in the run's data folder) that `tuneloop train` trains on."""
    import getpass

    from tuneloop import pipeline
    from tuneloop.synth import read_decisions

    cfg = _load(config, set)
    chosen = read_decisions(decisions) if decisions is not None else _ask_decisions(cfg)
    result = pipeline.review(cfg, chosen, reviewer or getpass.getuser(), progress=console.print)
    if result.version is None:
        console.print("no accepted rows yet: the dataset is unchanged")


def _ask_decisions(cfg) -> list:
    """Each pending row shown in the terminal, with accept / edit / reject / skip / quit."""
    from rich.panel import Panel
    from rich.prompt import Prompt

    from tuneloop import pipeline
    from tuneloop.synth import Decision

    pending = pipeline.pending_rows(cfg)
    chosen = []
    for number, row in enumerate(pending, start=1):
        asked = "\n\n".join(f"[bold]{m['role']}[/]: {m['content']}" for m in row["messages"] if m["role"] != "system")
        score = f", judge score {row['judge_score']}" if row.get("judge_score") is not None else ""
        console.print(Panel(asked, title=f"{row['id']} ({number} of {len(pending)}{score})", highlight=False))
        action = Prompt.ask("[a]ccept, [e]dit, [r]eject, [s]kip, [q]uit", choices=list("aersq"), console=console)
        if action == "q":
            break
        if action == "e":
            answer = Prompt.ask("corrected answer", console=console)
            while (problem := pipeline.edit_problem(cfg, row, answer)) is not None:
                answer = Prompt.ask(f"{problem}; corrected answer", console=console)
            chosen.append(Decision(row["id"], "edit", answer))
        elif action != "s":
            chosen.append(Decision(row["id"], "accept" if action == "a" else "reject"))
    return chosen


@feedback_app.command("add")
@user_errors
def feedback_add(
    config: ConfigArg,
    completion_id: Annotated[str, typer.Argument(help="The `id` of the served completion.", show_default=False)],
    rating: Annotated[str, typer.Option(help="good or bad.", show_default=False)],
    correction: Annotated[str | None, typer.Option(help="The answer it should have given.")] = None,
    comment: Annotated[str | None, typer.Option(help="A note for whoever reads the feedback.")] = None,
    project: Annotated[str | None, typer.Option(help="The project of the API key the request came with.")] = None,
    set: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Rate a served completion (and correct it) from the command line, as `POST /v1/feedback` does."""
    from tuneloop import pipeline

    if rating not in ("good", "bad"):
        raise TuneloopError(f"--rating {rating!r}: expected good or bad")
    request_log = pipeline.open_request_log(_load(config, set))
    try:
        stored = request_log.add_feedback(completion_id, project, rating, correction, comment)
    finally:
        request_log.close()
    console.print(f"feedback {stored['id']} stored for {completion_id}")


def _print_monitor(report) -> None:
    from rich.table import Table

    table = Table(title=f"live traffic, last {report.window}")
    for column in ("version", "requests", "errors", "p50 ms", "p95 ms", "schema valid", "refusals", "input drift"):
        table.add_column(column)
    def share(value):
        return "-" if value is None else f"{value:.1%}"

    def ms(value):
        return "-" if value is None else f"{value:.0f}"

    for version, s in report.versions.items():
        drift = s["drift"]
        table.add_row(version, str(s["volume"]), share(s["error_rate"]), ms(s["latency_p50_ms"]),
                      ms(s["latency_p95_ms"]), share(s["schema_valid"]), share(s["refusal_share"]),
                      "not tested" if drift["reason"] else "DRIFTED" if drift["drifted"] else "no")
    console.print(table)
    for alert in report.alerts:
        err_console.print(f"[bold red]alert:[/] {alert['message']}", highlight=False)
    if not report.alerts:
        console.print("no alert fired")


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry, e.g. some containers
        return "unknown"


def _move_text(moved) -> str:
    start = "none" if moved.from_version is None else f"v{moved.from_version}"
    forced = ", forced" if moved.forced else ""
    return f"{start} → v{moved.to_version} ({moved.action} by {moved.who}, gate {moved.verdict}{forced})"


def _print_report(report) -> None:
    from tuneloop.evaluate.report import comparison_table, verdict

    console.print(comparison_table(report))
    console.print(verdict(report), highlight=False)


@app.command()
@user_errors
def export(
    config: ConfigArg,
    fmt: Annotated[
        Literal["merged", "gguf"],
        typer.Option("--format", help="`merged`: a Hugging Face model directory; `gguf`: a GGUF file and an Ollama Modelfile."),
    ],
    version: Annotated[int | None, typer.Option(help="Registered version (default: the one the bare model name serves).")] = None,
    quant: Annotated[Literal["f16", "q8_0", "q4_0"], typer.Option(help="gguf: how the matrices are stored.")] = "f16",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: runs/NAME/export/NAME-vN-FORMAT).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    set: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Export a registered version as a standalone model: merged safetensors, or GGUF for llama.cpp and Ollama."""
    from tuneloop.export import export as export_stage

    cfg = _load(config, set)
    target = export_stage(cfg, fmt, quant=quant, version=version, out=out, force=force)
    console.print(f"exported: {target}")


def main() -> None:  # pragma: no cover - console-script entry for `python -m tuneloop`
    app(prog_name="tuneloop")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
