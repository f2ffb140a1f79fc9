"""What stages hand each other. Each artifact is also written as `meta.json` in its stage directory,
so any stage can be re-run alone from what the previous one left on disk."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from tuneloop.errors import TuneloopError

T = TypeVar("T")
META = "meta.json"


def save_meta(artifact: Any, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    payload = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(artifact).items()}
    (directory / META).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_meta(cls: type[T], directory: Path, produced_by: str) -> T:
    meta = directory / META
    if not meta.is_file():
        raise TuneloopError(f"{meta}: not found; run `tuneloop {produced_by}` first")
    payload = json.loads(meta.read_text(encoding="utf-8"))
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.type in ("Path", "Path | None") and payload.get(field.name) is not None:
            payload[field.name] = Path(payload[field.name])
    return cls(**payload)


@dataclasses.dataclass(frozen=True)
class BaseModelRef:
    """A base model resolved to a local directory of weights and tokenizer."""

    name: str
    path: Path
    trust_remote_code: bool = False


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Validated, split examples in the internal chat form (one JSON object with `messages` per line)."""

    dir: Path
    train: Path
    val: Path
    test: Path
    hash: str
    split_hashes: dict[str, str]
    counts: dict[str, Any]  # row counts, plus per-reason and per-PII-kind breakdowns as nested dicts
    system_prompt: str | None = None
    answer_schema: Path | None = None


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A trained LoRA adapter and how it came to be."""

    dir: Path
    base_model: str
    dataset_hash: str
    method: str
    params: dict[str, Any]
    history: list[dict[str, float]]
    train_loss: float
    val_loss: float | None
    train_tokens: int
    train_seconds: float
    mlflow_run_id: str | None = None  # the run training logged to; `registry register` adds the version to it
    # With checkpoint scoring: the validation metric that chose the saved checkpoint, and that checkpoint's
    # step (None: the last one was kept, e.g. no score ever improved).
    checkpoint_metric: str | None = None
    best_step: int | None = None


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """Baseline and candidate metrics on the same test rows."""

    dir: Path
    rows: int
    baseline: dict[str, float]
    candidate: dict[str, float] | None
    report: Path | None = None
    # 95 % bootstrap intervals [low, high] per metric, and [difference, low, high] for candidate - baseline
    baseline_ci: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    candidate_ci: dict[str, list[float]] | None = None
    difference: dict[str, list[float]] | None = None
    # per-row flips on pass/fail metrics: {"metric": {"fixed": [row, ...], "broken": [row, ...]}}
    flips: dict[str, dict[str, list[int]]] | None = None
    gate_metrics: list[str] = dataclasses.field(default_factory=list)
    gate_passed: bool | None = None  # None: no candidate to gate
    gate_failures: list[str] = dataclasses.field(default_factory=list)
    html_report: Path | None = None
    # Further gate opponents by name ("3-shot baseline", "production"): their metrics, their 95 % intervals,
    # and [difference, low, high] for candidate - opponent on the same resampled rows.
    opponents: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    opponent_ci: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
    opponent_difference: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
    candidate_name: str = "fine-tuned"  # how the reports name the candidate
    # What was scored: the resolved adapter or model directory, or "MODEL at BASE_URL" for an endpoint.
    candidate_source: str | None = None
    # Per closed field / label metric: the test score of always answering the training split's most common value.
    majority: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """A registered adapter version in the registry."""

    name: str
    version: int
    run_id: str
    source: str
    base_model: str
    dataset_hash: str
    metrics: dict[str, float]
    # The gate at registration: "passed" or "failed" where `eval.enforce_gate` held, "not_enforced" where it
    # did not (whatever was scored), "unknown" for a version registered before verdicts were kept. Only a
    # passed version is promoted without --force.
    gate_verdict: str = "unknown"
    gate_failures: str = ""  # the failing metrics, "; "-separated, as the gate reported them
    # A fine-tuning job's model (`ft:<base>:<project>:<suffix>:<job id>`) is served under this one name only.
    served_name: str | None = None


@dataclasses.dataclass(frozen=True)
class Promotion:
    """One move of a model's `production` alias, as the registry keeps it: who moved it and when (ISO-8601,
    UTC), from which version (None: no version had it) to which, that version's gate verdict, and whether
    --force overrode that verdict."""

    action: Literal["promote", "rollback"]
    who: str
    when: str
    from_version: int | None
    to_version: int
    verdict: str
    forced: bool = False


@dataclasses.dataclass(frozen=True)
class MonitorReport:
    """Live traffic over one window (Unix times [since, until)): per served version its figures (volume,
    errors, latency, schema validity, refusals, length and label distributions, input drift), the alerts
    that fired, and the HTML report."""

    since: float
    until: float
    window: str
    versions: dict[str, dict[str, Any]]
    alerts: list[dict[str, Any]]
    html: Path
    webhook_error: str | None = None
