"""Model versions on MLflow: a local SQLite store by default, or any tracking server."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.artifacts import Adapter, Dataset, EvalReport, ModelVersion
from tuneloop.config import RegistryConfig
from tuneloop.errors import TuneloopError

if TYPE_CHECKING:
    from tuneloop.train import Tracking

# MLflow would otherwise send usage telemetry from every user's machine.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

EXPERIMENT = "tuneloop"
HEADLINE = ("schema_valid", "json_valid", "field_accuracy", "rouge_l")


def register(
    cfg: RegistryConfig,
    name: str,
    adapter: Adapter,
    report: EvalReport,
    data: Dataset,
    run_config: dict[str, Any],
    tags: dict[str, str] | None = None,
    gate_enforced: bool = True,
    served_name: str | None = None,
) -> ModelVersion:
    """Add the eval metrics, config and adapter to the run training logged (an adapter trained without
    tracking gets a new run with its params and per-step metrics) and register the adapter as a new
    version of model `name`, with `tags` (the dataset's lineage) and the gate's verdict on the version
    (`gate_enforced`: whether `eval.enforce_gate` held for it). With `served_name` the version is served
    under that name alone (a fine-tuning job's model), not as `<name>` and `<name>-v<N>`."""
    import mlflow
    from mlflow.entities import Metric

    client = _client(cfg)
    run, params, metrics = _training_run(client, adapter), {}, []
    if run is None:
        run = client.create_run(_experiment(client, cfg), run_name=_run_name(name))
        params = {
            "base_model": adapter.base_model,
            "method": adapter.method,
            "dataset_hash": data.hash,
            **{f"train.{k}": v for k, v in adapter.params.items()},
            **{f"data.{k}": v for k, v in data.counts.items()},
        }
        metrics = [
            Metric(key, value, int(time.time() * 1000), entry["step"])
            for entry in adapter.history
            for key, value in entry.items()
            if key != "step"
        ]
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics += [Metric(f"baseline.{k}", v, now, 0) for k, v in report.baseline.items()]
    metrics += [Metric(f"candidate.{k}", v, now, 0) for k, v in (report.candidate or {}).items()]
    for start in range(0, max(len(metrics), 1), 900):  # MLflow caps one batch at 1000 metrics
        client.log_batch(
            run_id,
            metrics=metrics[start : start + 900],
            params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()] if start == 0 else [],
            tags=[mlflow.entities.RunTag("dataset_hash", data.hash), mlflow.entities.RunTag("base_model", adapter.base_model)]
            if start == 0
            else [],
        )
    client.log_dict(run_id, run_config, "config.yaml")
    client.log_artifacts(run_id, str(adapter.dir), "adapter")
    # What the version was trained to answer: the server applies it to requests that bring none.
    client.log_dict(run_id, _serving_contract(data), f"adapter/{SERVING_CONTRACT}")
    if run.info.status == "RUNNING":
        client.set_terminated(run_id)

    headline = {k: v for k, v in (report.candidate or {}).items() if k in HEADLINE}
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, tags={"base_model": adapter.base_model})
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/adapter",
        run_id=run_id,
        tags={
            "base_model": adapter.base_model,
            "dataset_hash": data.hash,
            **{f"metric.{k}": f"{v:.4f}" for k, v in headline.items()},
            **{f"baseline.{k}": f"{report.baseline[k]:.4f}" for k in headline if k in report.baseline},
            **_gate_tags(report, gate_enforced),
            **({SERVED_NAME: served_name} if served_name else {}),
            **(tags or {}),
        },
        description=f"LoRA adapter on {adapter.base_model}, dataset {data.hash[:12]}",
    )
    return _to_artifact(version)


SERVING_CONTRACT = "serving.json"
SERVED_NAME = "served_name"
TAG_VALUE_LIMIT = 5000  # what every MLflow tracking server accepts in a tag value (older ones cap it there)


def _gate_tags(report: EvalReport, enforced: bool) -> dict[str, str]:
    """The version tags keeping the gate's verdict: `gate.passed` and `gate.enforced` as scored and
    configured, `gate.verdict` derived from both, and `gate.failures` (the failing metrics)."""
    passed = report.gate_passed is True
    verdict = "not_enforced" if not enforced else "passed" if passed else "failed"
    return {
        "gate.passed": str(passed).lower(),
        "gate.enforced": str(enforced).lower(),
        "gate.verdict": verdict,
        "gate.failures": "; ".join(report.gate_failures)[:TAG_VALUE_LIMIT],
    }


def _serving_contract(data: Dataset) -> dict[str, Any]:
    import json

    schema = json.loads(data.answer_schema.read_text(encoding="utf-8")) if data.answer_schema else None
    return {"system_prompt": data.system_prompt, "answer_schema": schema}


def training_tracking(cfg: RegistryConfig, name: str) -> Tracking:
    """Where training logs its run as it trains: this registry's store and experiment, so that `register`
    later adds the evaluation and the version to the same run."""
    from tuneloop.train import Tracking

    client = _client(cfg)
    return Tracking(uri=cfg.tracking_uri or default_tracking_uri(), experiment_id=_experiment(client, cfg),
                    run_name=_run_name(name))


def _training_run(client, adapter: Adapter):
    """The run training logged, or None: trained without tracking, or logged to another store."""
    from mlflow.exceptions import MlflowException

    if adapter.mlflow_run_id is None:
        return None
    try:
        return client.get_run(adapter.mlflow_run_id)
    except MlflowException:
        return None


def _run_name(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def list_versions(cfg: RegistryConfig, name: str | None = None) -> list[ModelVersion]:
    """Every registered version (of one model when `name` is given), newest first."""
    client = _client(cfg)
    found = client.search_model_versions(f"name = '{name}'" if name else None)
    return sorted((_to_artifact(v) for v in found), key=lambda v: (v.name, -v.version))


def adapter_paths(cfg: RegistryConfig, base_model: str) -> dict[str, Path]:
    """Local adapter directories of every version trained on `base_model`, by served name:
    `<model>-v<N>` for each version and `<model>` for the version with the `production` alias (the newest
    when no version on `base_model` has it); a version registered with a served name under that name only."""
    from mlflow.artifacts import download_artifacts

    _client(cfg)
    paths: dict[str, Path] = {}
    names: set[str] = set()
    for version in list_versions(cfg):
        if version.base_model != base_model:
            continue
        local = Path(download_artifacts(artifact_uri=version.source))
        if version.served_name:
            paths[version.served_name] = local
            continue
        paths.setdefault(version.name, local)  # newest first, so the bare name is the latest version
        paths[f"{version.name}-v{version.version}"] = local
        names.add(version.name)
    for name in names:
        production = production_version(cfg, name)
        if production is not None and production.base_model == base_model:
            paths[name] = paths[f"{name}-v{production.version}"]
    return paths


PRODUCTION = "production"


def production_version(cfg: RegistryConfig, name: str) -> ModelVersion | None:
    """The version of model `name` that carries the `production` alias, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    if not _exists(cfg):
        return None  # nothing registered here yet; do not create an empty registry
    client = _client(cfg)
    try:
        return _to_artifact(client.get_model_version_by_alias(name, PRODUCTION))
    except MlflowException:  # the model or the alias does not exist
        return None


def version_dir(cfg: RegistryConfig, name: str, number: int, base_model: str | None = None) -> Path:
    """The local adapter directory of version `number` of model `name`; with `base_model`, the version must
    have been trained on it."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    version = _numbered_version(cfg, name, number, base_model)
    try:
        return Path(download_artifacts(artifact_uri=version.source))
    except (MlflowException, OSError) as err:
        raise TuneloopError(f"registry: {name} version {number}: cannot fetch {version.source} ({err})") from None


def find_version(cfg: RegistryConfig, name: str, base_model: str, number: int | None = None) -> ModelVersion:
    """Version `number` of model `name`, or without a number the version the bare name serves (the one with the
    `production` alias, else the newest one trained on `base_model`)."""
    if number is not None:
        return _numbered_version(cfg, name, number, base_model)
    if not _exists(cfg):
        raise TuneloopError(f"registry {default_tracking_uri()}: nothing is registered here yet")
    production = production_version(cfg, name)
    if production is not None and production.base_model == base_model:
        return production
    newest = next((v for v in list_versions(cfg, name) if v.base_model == base_model), None)
    if newest is None:
        raise TuneloopError(f"registry: no version of {name!r} trained on {base_model} is registered")
    return newest


def _numbered_version(cfg: RegistryConfig, name: str, number: int, base_model: str | None) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    if not _exists(cfg):
        raise TuneloopError(f"registry {default_tracking_uri()}: nothing is registered here yet")
    client = _client(cfg)
    try:
        version = _to_artifact(client.get_model_version(name, str(number)))
    except MlflowException:
        raise TuneloopError(f"registry: model {name!r} has no version {number}") from None
    if base_model is not None and version.base_model != base_model:
        raise TuneloopError(
            f"registry: {name} version {number} was trained on {version.base_model}, not on {base_model}"
        )
    return version


def version_run(cfg: RegistryConfig, version: ModelVersion) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """The run config (its `config.yaml` artifact; None when the run has none) and the final metrics of the run
    that registered `version`."""
    import yaml
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    try:
        metrics = dict(client.get_run(version.run_id).data.metrics)
    except MlflowException:
        return None, {}
    try:
        config = yaml.safe_load(Path(download_artifacts(run_id=version.run_id, artifact_path="config.yaml")).read_text())
    except (MlflowException, OSError):
        config = None
    return (config if isinstance(config, dict) else None), metrics


def _exists(cfg: RegistryConfig) -> bool:
    """False only for the local default registry before anything was written to it."""
    return bool(cfg.tracking_uri) or Path(default_tracking_uri().removeprefix("sqlite:///")).is_file()


def _client(cfg: RegistryConfig):
    import mlflow
    from mlflow import MlflowClient

    uri = cfg.tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as err:  # MLflow raises many store-specific errors
        raise TuneloopError(f"registry {uri}: cannot open it ({type(err).__name__}: {str(err)[:200]})") from None
    return client


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def _experiment(client, cfg: RegistryConfig) -> str:
    existing = client.get_experiment_by_name(EXPERIMENT)
    if existing is not None:
        return existing.experiment_id
    location = None
    if not cfg.tracking_uri:  # local default: keep artifacts beside the database
        location = (Path.cwd() / "mlruns" / "artifacts").as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def _to_artifact(version) -> ModelVersion:
    tags = version.tags or {}
    return ModelVersion(
        name=version.name,
        version=int(version.version),
        run_id=version.run_id,
        source=version.source,
        base_model=tags.get("base_model", ""),
        dataset_hash=tags.get("dataset_hash", ""),
        metrics={k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")},
        gate_verdict=tags.get("gate.verdict", "unknown"),
        gate_failures=tags.get("gate.failures", ""),
        served_name=tags.get(SERVED_NAME),
    )


def delete_served(cfg: RegistryConfig, served_name: str) -> bool:
    """Delete the registered model whose versions are served as `served_name` (a fine-tuning job's model);
    False when no version is served under that name."""
    if not _exists(cfg):
        return False
    client = _client(cfg)
    names = {v.name for v in list_versions(cfg) if v.served_name == served_name}
    for name in names:
        client.delete_registered_model(name)
    return bool(names)
