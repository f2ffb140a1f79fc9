"""The `tuneloop` command: one short command per stage, plus `run` for the whole loop."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Callable

import typer
from rich.console import Console

from tuneloop.errors import TuneloopError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
registry_app = typer.Typer(no_args_is_help=True, help="Registered model versions (MLflow).")
app.add_typer(registry_app, name="registry")
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
    from tuneloop.models import resolve_base_model

    return resolve_base_model(cfg.base_model, cfg.cache_dir, cfg.trust_remote_code)


def _dataset(cfg):
    from tuneloop.artifacts import Dataset, load_meta

    return load_meta(Dataset, cfg.run_dir / "data", "data CONFIG")


def _adapter(cfg):
    from tuneloop.artifacts import Adapter, load_meta

    return load_meta(Adapter, cfg.run_dir / "train", "train CONFIG")


def _train(cfg, config: Path, overrides: list[str] | None, base, data, resume: bool = False):
    """The train stage in this process, or with `train.distributed` in several: this command again under
    `accelerate launch` (which sets LOCAL_RANK in each process it starts), on the data prepared on disk."""
    import os

    from tuneloop.evaluate.checkpoint import checkpoint_scorer
    from tuneloop.registry import training_tracking
    from tuneloop.train import train as train_stage

    # Resolved before a launch too, so its processes find the MLflow store and experiment already made.
    tracking = training_tracking(cfg.registry, cfg.model_name)
    if cfg.train.distributed == "none" or "LOCAL_RANK" in os.environ:
        return train_stage(cfg.train, data, base, cfg.run_dir, resume=resume, tracking=tracking,
                           score_checkpoint=checkpoint_scorer(cfg.eval, data))
    from tuneloop.train.launch import launch

    sets = [arg for override in overrides or [] for arg in ("--set", override)]
    launch(cfg.train, ["train", str(config.resolve()), *sets, *(["--resume"] if resume else [])])
    return _adapter(cfg)


def _candidate(cfg, base, spec: str | None):
    """What `--model` names: the configured endpoint, a registered version's adapter, or a directory."""
    import re

    if spec is None:
        return None
    if spec == "endpoint":
        if cfg.eval.endpoint is None:
            raise TuneloopError("--model endpoint needs eval.endpoint (base_url, model) in the config")
        from tuneloop.evaluate.endpoint import Endpoint

        return Endpoint.from_config(cfg.eval.endpoint, _secret(cfg.eval.endpoint.api_key_env))
    path = Path(spec).expanduser()
    reference = re.fullmatch(r"registry:(.+)/(\d+)", spec)
    if reference is None and not path.is_dir():  # a local directory wins over a NAME-vN lookalike
        reference = re.fullmatch(r"(.+)-v(\d+)", spec)
    if reference:
        from tuneloop.registry import version_dir

        return version_dir(cfg.registry, reference[1], int(reference[2]), base_model=base.name)
    if not path.is_dir():
        raise TuneloopError(
            f"--model {spec}: not a directory, a registered version (registry:NAME/N or NAME-vN) or `endpoint`"
        )
    return path.resolve()


def _production(cfg, base, candidate) -> Path | None:
    """The adapter of the version with the `production` alias, when there is one on this base model and it
    is not the candidate itself."""
    from tuneloop.registry import production_version, version_dir

    version = production_version(cfg.registry, cfg.model_name)
    if version is None or version.base_model != base.name:
        return None
    path = version_dir(cfg.registry, version.name, version.version, base_model=base.name)
    if isinstance(candidate, Path) and candidate.resolve() == path.resolve():
        return None
    console.print(f"opponent: {version.name} version {version.version} (alias production)")
    return path


def _judge(cfg):
    if cfg.eval.judge is None:
        return None
    from tuneloop.evaluate.judge import Judge

    return Judge.from_config(cfg.eval.judge, _secret(cfg.eval.judge.api_key_env))


def _secret(variable: str | None) -> str | None:
    import os

    if variable is None:
        return None
    if not os.environ.get(variable):
        raise TuneloopError(f"environment variable {variable} (the API key) is not set")
    return os.environ[variable]


@app.command()
@user_errors
def run(config: ConfigArg, set: SetOpt = None, debug: DebugOpt = False) -> None:
    """Whole loop: data -> baseline eval -> LoRA training -> eval -> report -> registry."""
    from tuneloop.data import prepare
    from tuneloop.evaluate import evaluate
    from tuneloop.evaluate.report import comparison_table, verdict
    from tuneloop.registry import register

    cfg = _load(config, set)
    base = _base(cfg)
    data = prepare(cfg.data, cfg.run_dir, base)
    _print_counts(data)
    console.print("[bold]1/3[/] evaluating the baseline (base model, same system prompt)")
    evaluate(cfg.eval, data, base, None, cfg.run_dir, judge=_judge(cfg))
    console.print(f"[bold]2/3[/] training a LoRA adapter on {data.counts['train']} rows")
    adapter = _train(cfg, config, set, base, data)
    console.print("[bold]3/3[/] evaluating the fine-tuned model on the same test rows")
    report = evaluate(cfg.eval, data, base, adapter, cfg.run_dir, production=_production(cfg, base, adapter.dir),
                      judge=_judge(cfg))
    console.print(comparison_table(report))
    console.print(verdict(report), highlight=False)
    console.print(f"results: {cfg.run_dir.resolve()}  (report.md, eval_report.html, loss.png, metrics.png)")
    if report.gate_passed is False and cfg.eval.enforce_gate:
        raise typer.Exit(3)  # refused: not registered, so never served
    version = register(cfg.registry, cfg.model_name, adapter, report, data, cfg.model_dump(mode="json"))
    console.print(f"registered [bold]{version.name}[/] version {version.version}")


@app.command()
@user_errors
def data(config: ConfigArg, set: SetOpt = None, debug: DebugOpt = False) -> None:
    """Validate and split the examples into train/val/test."""
    from tuneloop.data import prepare

    cfg = _load(config, set)
    _print_counts(prepare(cfg.data, cfg.run_dir, _base(cfg)))
    console.print(f"data: {(cfg.run_dir / 'data').resolve()}")


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

    cfg = _load(config, set)
    adapter = _train(cfg, config, set, _base(cfg), _dataset(cfg), resume=resume)
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
    from tuneloop.evaluate import evaluate
    from tuneloop.evaluate.report import comparison_table, verdict

    if baseline_only and (gate or model):
        raise TuneloopError("--baseline-only scores no candidate: it cannot be combined with --gate or --model")
    cfg = _load(config, set)
    base = _base(cfg)
    adapter = None if baseline_only or model else _adapter(cfg)
    target = None if baseline_only else _candidate(cfg, base, model)
    production = None if baseline_only else _production(cfg, base, target if target is not None else adapter.dir)
    name = None if model is None else f"{cfg.eval.endpoint.model} (endpoint)" if model == "endpoint" else model
    report = evaluate(cfg.eval, _dataset(cfg), base, adapter, cfg.run_dir, model=target, production=production,
                      judge=_judge(cfg), candidate_name=name)
    console.print(comparison_table(report))
    console.print(verdict(report), highlight=False)
    if report.html_report is not None:
        console.print(f"report: {report.html_report.resolve()}")
    if gate and report.gate_passed is False:
        raise typer.Exit(3)


@app.command()
@user_errors
def serve(
    config: ConfigArg,
    port: Annotated[int | None, typer.Option(help="Port (default: serve.port).")] = None,
    set: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """OpenAI-compatible server for the base model and every registered adapter on it."""
    from tuneloop.registry import adapter_paths
    from tuneloop.serve import serve as serve_stage

    cfg = _load(config, set)
    serve_cfg = cfg.serve if port is None else cfg.serve.model_copy(update={"port": port})
    base = _base(cfg)
    adapters = adapter_paths(cfg.registry, base.name)
    console.print(f"serving {', '.join([base.name, *adapters])} on http://{serve_cfg.host}:{serve_cfg.port}/v1")
    serve_stage(serve_cfg, base, adapters)


@registry_app.command("register")
@user_errors
def registry_register(config: ConfigArg, set: SetOpt = None, debug: DebugOpt = False) -> None:
    """Register the run's trained and evaluated adapter as a new version."""
    from tuneloop.artifacts import EvalReport, load_meta
    from tuneloop.registry import register

    cfg = _load(config, set)
    report = load_meta(EvalReport, cfg.run_dir / "eval", "eval CONFIG")
    adapter = _adapter(cfg)
    if report.candidate is None:
        raise TuneloopError(f"{cfg.run_dir / 'eval'}: no fine-tune was evaluated; run `tuneloop eval CONFIG` first")
    if report.candidate_source != str(adapter.dir.resolve()):
        raise TuneloopError(
            f"{cfg.run_dir / 'eval'}: the last evaluation scored {report.candidate_name} ({report.candidate_source}), "
            f"not this run's adapter {adapter.dir}; run `tuneloop eval CONFIG` without --model first"
        )
    if report.gate_passed is False and cfg.eval.enforce_gate:
        failures = "; ".join(report.gate_failures)
        raise TuneloopError(f"not registered: the fine-tune did not beat the baseline ({failures})")
    version = register(cfg.registry, cfg.model_name, adapter, report, _dataset(cfg), cfg.model_dump(mode="json"))
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


def _print_counts(dataset) -> None:
    c = dataset.counts
    console.print(
        f"data: read {c['read']} rows, rejected {c['rejected']}, duplicates removed {c['duplicates_removed']}, "
        f"test leaks removed {c['test_leaks_removed']} -> train {c['train']}, val {c['val']}, test {c['test']}"
        f"  (dataset {dataset.hash[:12]})"
    )
    if c["rejected"]:
        console.print(f"  rejected rows and reasons: {dataset.dir / 'rejects.jsonl'}")


def main() -> None:  # pragma: no cover - console-script entry for `python -m tuneloop`
    app(prog_name="tuneloop")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
