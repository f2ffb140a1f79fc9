"""The loop's steps: data -> baseline eval -> train -> eval -> gate -> register, and `run`, which chains them;
promotion and rollback of registered versions. The gate policy, which candidate is scored, the production
opponent, the local/distributed switch and each run's dataset version (with its lineage) are decided here
and nowhere else.

Like `cli.py`, whose logic this is, it reads the environment: the API keys the config names, and the
LOCAL_RANK that `accelerate launch` sets in the processes it starts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset, EvalReport, ModelVersion, Promotion, load_meta
from tuneloop.config import RunConfig
from tuneloop.errors import TuneloopError

if TYPE_CHECKING:
    from tuneloop.evaluate.endpoint import Endpoint
    from tuneloop.evaluate.judge import Judge

Progress = Callable[[str], None]  # receives one line of progress at a time, e.g. `rich.console.Console.print`
TrainLog = Callable[[int, int, dict], None]  # step, total steps, the trainer's log at that step
DATASET_VERSION = "dataset_version.json"
MAX_TAG_CHARS = 5000  # MLflow keeps tag values up to 8000 characters; leave room


def silent(line: str) -> None:
    """Progress for callers that show none."""


@dataclasses.dataclass(frozen=True)
class DatasetVersion:
    """What a run's data was made from: the content hash of its splits, every source file with its own
    SHA-256, the row counts, and the dataset version it was derived from (None: read from its sources)."""

    hash: str
    sources: dict[str, str]
    counts: dict[str, int]
    split_hashes: dict[str, str]
    parent: str | None = None
    # Request ids of the feedback rows this version added to training, and of those held out as golden.
    feedback: list[str] = dataclasses.field(default_factory=list)
    golden: list[str] = dataclasses.field(default_factory=list)
    # Reviewed synthetic rows in training: how many, their file, teachers, the teachers' terms, reviewers.
    synthetic: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one pass of the loop made. `version` is the registered version, or None when the gate refused
    the adapter; `refusal` then says why."""

    dataset: Dataset
    dataset_version: DatasetVersion
    adapter: Adapter
    report: EvalReport
    version: ModelVersion | None
    refusal: str | None = None


def run(
    cfg: RunConfig,
    progress: Progress = silent,
    on_train_log: TrainLog | None = None,
    resume: bool = False,
    served_name: str | None = None,
    force: bool = False,
) -> RunResult:
    """Whole loop: prepare the data, score the baseline, train, score the fine-tune against the baselines
    (and the production version), and register it unless the gate refuses it. `on_train_log` receives
    the trainer's logs; with `resume`, training continues from its newest checkpoint when there is one;
    `served_name` is the one name the registered version is served under (a fine-tuning job's model).
    With `eval.target`, a baseline that already reaches it raises FineTuningNotNeeded before any training,
    unless `force`."""
    from tuneloop.evaluate import evaluate

    base = resolve_base(cfg)
    data, dataset_version = prepare_data(cfg, base, progress)
    if cfg.eval.target is not None and not force:
        from tuneloop.pipeline.plan import FineTuningNotNeeded, baseline_verdict

        verdict, checked = baseline_verdict(cfg, data, base, progress)
        progress(verdict["reason"])
        if verdict["met"]:
            raise FineTuningNotNeeded(verdict, checked)
    progress("1/3 evaluating the baseline (base model, same system prompt)")
    evaluate(cfg.eval, data, base, None, cfg.run_dir, judge=judge_for(cfg))
    progress(f"2/3 training a LoRA adapter on {data.counts['train']} rows")
    adapter = train_adapter(cfg, data, base, resume=resume and has_checkpoint(cfg), on_log=on_train_log)
    progress("3/3 evaluating the fine-tuned model on the same test rows")
    production = production_opponent(cfg, base, adapter.dir, progress)
    report = evaluate(cfg.eval, data, base, adapter, cfg.run_dir, production=production, judge=judge_for(cfg))
    refusal = gate_refusal(report, cfg.eval.enforce_gate)
    if refusal is not None:  # not registered, so never served
        return RunResult(data, dataset_version, adapter, report, None, refusal)
    version = register_version(cfg, adapter, report, data, dataset_version, served_name)
    return RunResult(data, dataset_version, adapter, report, version)


def resolve_base(cfg: RunConfig) -> BaseModelRef:
    from tuneloop.models import resolve_base_model

    return resolve_base_model(cfg.base_model, cfg.cache_dir, cfg.trust_remote_code)


def prepare_data(
    cfg: RunConfig, base: BaseModelRef | None = None, progress: Progress = silent, **lineage
) -> tuple[Dataset, DatasetVersion]:
    """Validate, clean and split the examples under `run_dir/data`, and record the dataset version there
    (with `lineage`: the parent dataset and feedback rows of a retrain)."""
    from tuneloop.data import prepare

    data = prepare(cfg.data, cfg.run_dir, base or resolve_base(cfg))
    version = record_version(cfg, data, **lineage)
    c = data.counts
    progress(
        f"data: read {c['read']} rows, rejected {c['rejected']}, duplicates removed {c['duplicates_removed']}, "
        f"test leaks removed {c['test_leaks_removed']} -> train {c['train']}, val {c['val']}, test {c['test']}"
        f"  (dataset {data.hash[:12]})"
    )
    if c["rejected"]:
        progress(f"  rejected rows and reasons: {data.dir / 'rejects.jsonl'}")
    return data, version


def record_version(cfg: RunConfig, data: Dataset, **lineage) -> DatasetVersion:
    from tuneloop.data import input_files

    files = input_files(cfg.data)
    if cfg.data.synthetic_path is not None:
        from tuneloop.synth import synthetic_lineage

        lineage["synthetic"] = {"rows": data.counts["synthetic"], **synthetic_lineage(cfg.data.synthetic_path)}
    version = DatasetVersion(
        hash=data.hash,
        sources={str(file): _sha256(file) for file in files},
        counts={k: v for k, v in data.counts.items() if isinstance(v, int)},
        split_hashes=data.split_hashes,
        **lineage,  # parent, feedback and golden, for a dataset made by `retrain`
    )
    text = json.dumps(dataclasses.asdict(version), indent=2, sort_keys=True) + "\n"
    (data.dir / DATASET_VERSION).write_text(text, encoding="utf-8")
    return version


def dataset_version(data: Dataset) -> DatasetVersion | None:
    """The version recorded beside `data`; None when that record is missing or belongs to other data
    (prepared by a tuneloop that kept none)."""
    path = data.dir / DATASET_VERSION
    if not path.is_file():
        return None
    version = DatasetVersion(**json.loads(path.read_text(encoding="utf-8")))
    return version if version.hash == data.hash else None


def lineage_tags(version: DatasetVersion) -> dict[str, str]:
    """The registry tags naming where a version's training data came from."""
    tags = {"lineage.dataset": version.hash, "lineage.sources": json.dumps(version.sources, sort_keys=True)}
    if version.parent is not None:
        tags["lineage.parent"] = version.parent
    if version.synthetic:
        tags["lineage.synthetic_rows"] = str(version.synthetic["rows"])
        tags["lineage.synthetic_teachers"] = ",".join(version.synthetic["teachers"])
        tags["lineage.synthetic_terms"] = " | ".join(version.synthetic["terms"])[:MAX_TAG_CHARS]
        tags["lineage.reviewed_by"] = ",".join(version.synthetic["reviewed_by"])
    if version.feedback:
        tags["lineage.feedback_rows"] = str(len(version.feedback))
        listed = ",".join(version.feedback)
        if len(listed) > MAX_TAG_CHARS:  # the whole list stays in the dataset version file
            cut = listed[:MAX_TAG_CHARS].rsplit(",", 1)[0]
            listed = f"{cut},... (+{len(version.feedback) - cut.count(',') - 1} more in {DATASET_VERSION})"
        tags["lineage.feedback"] = listed
    return tags


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_dataset(cfg: RunConfig) -> Dataset:
    return load_meta(Dataset, cfg.run_dir / "data", "data CONFIG")


def load_adapter(cfg: RunConfig) -> Adapter:
    return load_meta(Adapter, cfg.run_dir / "train", "train CONFIG")


def train_adapter(
    cfg: RunConfig,
    data: Dataset | None = None,
    base: BaseModelRef | None = None,
    resume: bool = False,
    on_log: TrainLog | None = None,
) -> Adapter:
    """The train stage on `data` (default: the data prepared on disk) in this process, or with
    `train.distributed` in several: `tuneloop train` on this config under `accelerate launch` (which sets
    LOCAL_RANK in each process it starts). With `resume`, continue from the newest checkpoint."""
    import yaml

    from tuneloop.evaluate.checkpoint import checkpoint_scorer
    from tuneloop.registry import training_tracking
    from tuneloop.train import train

    base = base or resolve_base(cfg)
    data = data or load_dataset(cfg)
    # Resolved before a launch too, so its processes find the MLflow store and experiment already made.
    tracking = training_tracking(cfg.registry, cfg.model_name)
    if cfg.train.distributed == "none" or "LOCAL_RANK" in os.environ:
        return train(cfg.train, data, base, cfg.run_dir, resume=resume, tracking=tracking,
                     score_checkpoint=checkpoint_scorer(cfg.eval, data), on_log=on_log)
    from tuneloop.train.launch import launch

    # The launched processes read this config, already resolved, whoever called: the CLI or the jobs API.
    config = cfg.run_dir / "train" / "launch.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    launch(cfg.train, ["train", str(config.resolve()), *(["--resume"] if resume else [])])
    return load_adapter(cfg)


def has_checkpoint(cfg: RunConfig) -> bool:
    """Whether training left a checkpoint in the run directory to resume from."""
    from tuneloop.train import newest_checkpoint

    return newest_checkpoint(cfg.run_dir / "train" / "checkpoints") is not None


def evaluate_run(
    cfg: RunConfig, model: str | None = None, baseline_only: bool = False, progress: Progress = silent
) -> EvalReport:
    """Score the baselines and a candidate on the run's test split: `model` as `resolve_candidate` reads it,
    or by default the run's trained adapter; with `baseline_only`, no candidate."""
    from tuneloop.evaluate import evaluate

    if baseline_only and model is not None:
        raise TuneloopError("baseline_only scores no candidate: it cannot be combined with a model")
    base = resolve_base(cfg)
    adapter = None if baseline_only or model else load_adapter(cfg)
    target = None if baseline_only else resolve_candidate(cfg, base, model)
    production = None
    if not baseline_only:
        production = production_opponent(cfg, base, target if target is not None else adapter.dir, progress)
    name = None if model is None else f"{cfg.eval.endpoint.model} (endpoint)" if model == "endpoint" else model
    return evaluate(cfg.eval, load_dataset(cfg), base, adapter, cfg.run_dir, model=target, production=production,
                    judge=judge_for(cfg), candidate_name=name)


def resolve_candidate(cfg: RunConfig, base: BaseModelRef, spec: str | None) -> Path | Endpoint | None:
    """What `spec` names: the configured endpoint (`endpoint`), a registered version's adapter
    (`registry:NAME/N` or `NAME-vN`), or an adapter or model directory; None for None."""
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


def production_opponent(
    cfg: RunConfig, base: BaseModelRef, candidate: Path | Endpoint, progress: Progress = silent
) -> Path | None:
    """The adapter of the version with the `production` alias, when there is one on this base model and it
    is not the candidate itself."""
    from tuneloop.registry import production_version, version_dir

    version = production_version(cfg.registry, cfg.model_name)
    if version is None or version.base_model != base.name:
        return None
    path = version_dir(cfg.registry, version.name, version.version, base_model=base.name)
    if isinstance(candidate, Path) and candidate.resolve() == path.resolve():
        return None
    progress(f"opponent: {version.name} version {version.version} (alias production)")
    return path


def gate_refusal(report: EvalReport, enforce: bool) -> str | None:
    """Why the candidate of `report` may not be registered, or None. A failed gate refuses only where it is
    enforced (`eval.enforce_gate` for run and register, `--gate` for eval); no candidate, no gate."""
    if report.gate_passed is False and enforce:
        return f"not registered: the fine-tune did not beat the baseline ({'; '.join(report.gate_failures)})"
    return None


def register_adapter(cfg: RunConfig) -> ModelVersion:
    """Register the run's trained adapter with its last evaluation, which must have scored that adapter and,
    where the gate is enforced, passed it."""
    report = load_meta(EvalReport, cfg.run_dir / "eval", "eval CONFIG")
    adapter = load_adapter(cfg)
    if report.candidate is None:
        raise TuneloopError(f"{cfg.run_dir / 'eval'}: no fine-tune was evaluated; run `tuneloop eval CONFIG` first")
    if report.candidate_source != str(adapter.dir.resolve()):
        raise TuneloopError(
            f"{cfg.run_dir / 'eval'}: the last evaluation scored {report.candidate_name} ({report.candidate_source}), "
            f"not this run's adapter {adapter.dir}; run `tuneloop eval CONFIG` without --model first"
        )
    refusal = gate_refusal(report, cfg.eval.enforce_gate)
    if refusal is not None:
        raise TuneloopError(refusal)
    data = load_dataset(cfg)
    return register_version(cfg, adapter, report, data, dataset_version(data))


def register_version(
    cfg: RunConfig,
    adapter: Adapter,
    report: EvalReport,
    data: Dataset,
    version: DatasetVersion | None,
    served_name: str | None = None,
) -> ModelVersion:
    from tuneloop.registry import register

    tags = lineage_tags(version) if version is not None else None
    return register(cfg.registry, cfg.model_name, adapter, report, data, cfg.model_dump(mode="json"), tags,
                    gate_enforced=cfg.eval.enforce_gate, served_name=served_name)


def promote_version(cfg: RunConfig, version: int, by: str, force: bool = False) -> Promotion:
    """Give version `version` of the config's model the `production` alias (the version its bare name serves),
    once it loads on the config's base model. A version without a passed gate, or one that does not load,
    needs `force`."""
    from tuneloop.registry import find_version, production_version, promote, promotion_refusal

    base = resolve_base(cfg)
    target = find_version(cfg.registry, cfg.model_name, base.name, version)
    # Refused before the (slow) load where the registry would refuse it anyway.
    refusal = promotion_refusal(target, production_version(cfg.registry, cfg.model_name), force)
    if refusal is not None:
        raise TuneloopError(f"registry: {refusal}")
    try:
        _check_loads(cfg, base, target, "promoted")
    except TuneloopError as err:
        if not force:
            raise
        # Forced: the alias moves; a server that cannot load the version keeps serving the one it has.
        logging.getLogger("tuneloop").warning("promoting anyway (--force): %s", err)
    return promote(cfg.registry, cfg.model_name, version, by, force)


def rollback_version(cfg: RunConfig, by: str) -> Promotion:
    """Give the `production` alias back to the version the latest promotion still in effect took it from,
    once that version loads on the config's base model."""
    from tuneloop.registry import rollback, rollback_target

    base = resolve_base(cfg)
    target = rollback_target(cfg.registry, cfg.model_name)
    _check_loads(cfg, base, target, "rolled back to")
    return rollback(cfg.registry, cfg.model_name, by)


def _check_loads(cfg: RunConfig, base: BaseModelRef, version: ModelVersion, verb: str) -> None:
    """A version that cannot answer (corrupt or missing weights, another base model) never gets the alias."""
    from tuneloop.evaluate.generate import load_for_generation
    from tuneloop.registry import version_dir

    directory = version_dir(cfg.registry, version.name, version.version, base_model=base.name)
    try:
        load_for_generation(base, directory)
    except TuneloopError as err:
        raise TuneloopError(f"registry: {version.name} version {version.version} does not load, so it was not "
                            f"{verb}: {err}") from None


def judge_for(cfg: RunConfig) -> Judge | None:
    if cfg.eval.judge is None:
        return None
    from tuneloop.evaluate.judge import Judge

    return Judge.from_config(cfg.eval.judge, _secret(cfg.eval.judge.api_key_env))


def _secret(variable: str | None) -> str | None:
    if variable is None:
        return None
    if not os.environ.get(variable):
        raise TuneloopError(f"environment variable {variable} (the API key) is not set")
    return os.environ[variable]
