"""The loop as functions: `run` (data -> baseline eval -> train -> eval -> gate -> register), `retrain` (the
next turn, on feedback from live traffic), the stage steps they are made of, promotion and rollback, and
monitoring. The CLI, the tests and the jobs API call these and print or return what comes back."""

from tuneloop.pipeline.loop import (
    DatasetVersion,
    RunResult,
    dataset_version,
    evaluate_run,
    gate_refusal,
    lineage_tags,
    load_adapter,
    load_dataset,
    prepare_data,
    production_opponent,
    promote_version,
    register_adapter,
    resolve_base,
    resolve_candidate,
    rollback_version,
    run,
    train_adapter,
)
from tuneloop.pipeline.plan import FineTuningNotNeeded, baseline_verdict, plan
from tuneloop.pipeline.synth import ReviewResult, SynthResult, edit_problem, pending_rows, review, synth
from tuneloop.pipeline.retrain import RetrainResult, latest_dataset, monitor_traffic, open_request_log, retrain

__all__ = [
    "DatasetVersion",
    "FineTuningNotNeeded",
    "baseline_verdict",
    "plan",
    "RetrainResult",
    "ReviewResult",
    "SynthResult",
    "edit_problem",
    "pending_rows",
    "review",
    "synth",
    "RunResult",
    "dataset_version",
    "evaluate_run",
    "gate_refusal",
    "latest_dataset",
    "lineage_tags",
    "load_adapter",
    "load_dataset",
    "monitor_traffic",
    "open_request_log",
    "prepare_data",
    "production_opponent",
    "promote_version",
    "register_adapter",
    "resolve_base",
    "resolve_candidate",
    "retrain",
    "rollback_version",
    "run",
    "train_adapter",
]
