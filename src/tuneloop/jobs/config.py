"""A job's run configuration: the server's config with the job's files, method and hyperparameters.
`"auto"` (or nothing) means tuneloop's defaults; `learning_rate_multiplier` multiplies `train.learning_rate`
(or, for a job of another method than the config's, that method's default rate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneloop.config import DEFAULT_LEARNING_RATES, RunConfig
from tuneloop.jobs.protocol import Hyperparameters, JobCreateRequest


def resolved_method(cfg: RunConfig, request: JobCreateRequest) -> dict[str, Any]:
    """The job's method as the API shows it, every `"auto"` replaced by the value training will use."""
    kind = request.method.type if request.method is not None else "supervised"
    asked = request.method.hyperparameters() if request.method is not None else Hyperparameters()
    if request.hyperparameters is not None and request.method is None:
        asked = request.hyperparameters
    if kind != "dpo" and asked.beta is not None:
        raise ValueError("method.supervised.hyperparameters.beta: beta applies to dpo only")

    def chosen(value, default):
        return default if value in (None, "auto") else value

    epochs = chosen(asked.n_epochs, cfg.train.epochs)
    values: dict[str, Any] = {
        "batch_size": chosen(asked.batch_size, cfg.train.batch_size),
        "learning_rate_multiplier": float(chosen(asked.learning_rate_multiplier, 1.0)),
        "n_epochs": int(epochs) if float(epochs).is_integer() else epochs,
    }
    if kind == "dpo":
        values["beta"] = float(chosen(asked.beta, cfg.train.dpo_beta))
    for name, value in values.items():
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"hyperparameters.{name}: must be a positive number or 'auto', got {value!r}")
    # Which values the client chose (not "auto"): an explicit epoch count wins over the server's max_steps.
    explicit = [name for name, value in asked.model_dump().items() if value not in (None, "auto")]
    return {"type": kind, kind: {"hyperparameters": values}, EXPLICIT: explicit}


EXPLICIT = "explicit"  # kept with the job's method, not shown in the API's objects


def job_config(cfg: RunConfig, job: dict, run_dir: Path, training: Path, validation: Path | None) -> RunConfig:
    """The configuration one job runs under, in `run_dir`: the training file split into train and test
    (`api.test_fraction`, seeded by the job's seed), with the validation file as the validation split
    when there is one; the server's data checks, evaluation settings and gate; the job's hyperparameters.
    The server's own task (system prompt, answer schema, its metrics) does not apply to a job's data."""
    kind = job["method"]["type"]
    values = job["method"][kind]["hyperparameters"]
    data = cfg.data.model_copy(update={
        "path": training, "val_path": validation, "test_path": None,
        "val_fraction": 0.0 if validation is not None else cfg.data.val_fraction,
        "test_fraction": cfg.api.test_fraction, "seed": job["seed"],
        "format": "auto", "columns": {}, "system_prompt": None, "answer_schema": None, "label_field": None,
    })
    method = "dpo" if kind == "dpo" else ("lora" if cfg.train.method == "dpo" else cfg.train.method)
    # The config's rate was set for its own method; a job of the other kind starts from its method's default.
    learning_rate = cfg.train.learning_rate if method == cfg.train.method else DEFAULT_LEARNING_RATES[method]
    train = cfg.train.model_copy(update={
        "method": method,
        "epochs": float(values["n_epochs"]),
        "max_steps": None if "n_epochs" in job["method"].get(EXPLICIT, []) else cfg.train.max_steps,
        "batch_size": int(values["batch_size"]),
        "learning_rate": learning_rate * values["learning_rate_multiplier"],
        "dpo_beta": values.get("beta", cfg.train.dpo_beta),
        "seed": job["seed"],
    })
    evaluation = cfg.eval.model_copy(update={"metrics": [], "checkpoint_metric": None})
    registry = cfg.registry.model_copy(update={"model_name": registered_name(job["id"])})
    return cfg.model_copy(update={"name": job["id"], "output_dir": run_dir, "data": data, "train": train,
                                  "eval": evaluation, "registry": registry})


def registered_name(job_id: str) -> str:
    """The job's model in the MLflow registry, whose names cannot hold the ':' of the served name."""
    return f"ft-{job_id}"


def fine_tuned_name(job: dict) -> str:
    """`ft:<base>:<project>:<suffix>:<job id>`, as OpenAI names a fine-tune."""
    return f"ft:{job['model']}:{job['project']}:{job['suffix'] or ''}:{job['id']}"
