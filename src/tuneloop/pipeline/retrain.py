"""The next turn of the loop on live traffic: feedback -> new dataset version -> train -> evaluate (test set
and production golden set) -> register -> promote; and the request log and monitoring that feed it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tuneloop.artifacts import Dataset, EvalReport, ModelVersion, MonitorReport, load_meta
from tuneloop.config import RunConfig
from tuneloop.errors import TuneloopError
from tuneloop.pipeline.loop import (
    DatasetVersion,
    Progress,
    gate_refusal,
    judge_for,
    load_dataset,
    prepare_data,
    production_opponent,
    promote_version,
    record_version,
    register_version,
    resolve_base,
    silent,
    train_adapter,
)

if TYPE_CHECKING:
    from tuneloop.serve.request_log import RequestLog


@dataclasses.dataclass(frozen=True)
class RetrainResult:
    """What one `retrain` did: `promoted` (the new version serves the bare name), `refused` (by the gate;
    or registered but not promoted where the gate is not enforced) or `nothing_new` (no feedback row that
    earlier retrains have not seen). `skipped` counts feedback rows that made no example, by reason."""

    outcome: Literal["promoted", "refused", "nothing_new"]
    message: str
    run_dir: Path | None = None
    dataset_version: DatasetVersion | None = None
    report: EvalReport | None = None
    golden_report: EvalReport | None = None
    version: ModelVersion | None = None
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)


RETRAINS = "retrain"  # run_dir/retrain/NNN: one directory per retrain, a run directory of its own
RETRAIN_RESULT = "result.json"


def retrain(cfg: RunConfig, progress: Progress = silent) -> RetrainResult:
    """The next turn of the loop: the latest dataset version plus the corrected answers (and good-rated ones
    with `retrain.include_good`) logged since, through the data stage, the test split frozen; a share of the
    feedback rows (by a seeded hash) is the production golden set instead. Train, evaluate against the
    baselines and the production version on the test set (and the golden set once it is large enough),
    register and promote when the gate passes. One retrain of a run at a time."""
    from filelock import FileLock, Timeout

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cfg.run_dir / "retrain.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise TuneloopError(f"another retrain of {cfg.name} is running ({lock.lock_file}); one at a time") from None
    try:
        return _retrain(cfg, progress)
    finally:
        lock.release()


def _retrain(cfg: RunConfig, progress: Progress) -> RetrainResult:
    from tuneloop.data.feedback import feedback_examples
    from tuneloop.serve.request_log import connect, read_feedback

    done = _finished_retrains(cfg)
    # By feedback row: a completion corrected again after a retrain brings its new correction in.
    seen = {json.loads(line)["feedback_id"] for d in done for line in _lines(d / "sources" / "pool" / "feedback.jsonl")}
    examples = feedback_examples(read_feedback(connect(cfg.request_log_url)), cfg.model_name,
                                 cfg.retrain.include_good, cfg.retrain.golden_share, cfg.retrain.seed)
    new = [e for e in examples.train if e["feedback_id"] not in seen]
    skipped = dict(sorted(examples.skipped.items()))
    progress(f"feedback: {len(new)} new training rows ({len(examples.train) - len(new)} used before), "
             f"{len(examples.golden)} golden rows; skipped {skipped or 'none'}")
    if not new:
        return RetrainResult("nothing_new", "nothing new to train on: no corrected answer since the last retrain",
                             skipped=skipped)
    numbers = [int(d.name) for d in (cfg.run_dir / RETRAINS).glob("[0-9]*") if d.name.isdigit()]
    out = cfg.run_dir / RETRAINS / f"{max(numbers, default=0) + 1:03d}"
    run_cfg, data, version = _next_dataset(cfg, out, new, examples.golden, progress)
    result = RetrainResult("nothing_new", "", out, version, skipped=skipped)
    if not version.feedback:
        result = dataclasses.replace(result, message=f"nothing new to train on: the data stage removed all {len(new)} "
                                     f"new feedback rows ({data.dir / 'removed.jsonl'})")
    else:
        result = _train_and_gate(cfg, run_cfg, data, version, examples.golden, result, progress)
    (out / RETRAIN_RESULT).write_text(json.dumps({"outcome": result.outcome, "message": result.message,
                                                  "version": result.version and result.version.version}), "utf-8")
    return result


def _next_dataset(cfg: RunConfig, out: Path, new: list[dict], golden: list[dict], progress: Progress):
    """The previous dataset's train and val rows plus the new feedback rows, through the data stage, with
    the previous test split frozen as the test file; recorded as a dataset version with its lineage."""
    previous = latest_dataset(cfg)
    pool = out / "sources" / "pool"
    pool.mkdir(parents=True)
    # A prompt corrected again is trained on its newest answer only: the earlier row of that prompt goes.
    corrected = {_asked(e["messages"]) for e in new}
    carried = [line for split in (previous.train, previous.val) for line in _lines(split)]
    kept = [line for line in carried if _asked(json.loads(line)["messages"]) not in corrected]
    (pool / "previous.jsonl").write_text("".join(line + "\n" for line in kept), "utf-8")
    (pool / "feedback.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in new), "utf-8")
    frozen = out / "sources" / "test.jsonl"
    frozen.write_text(previous.test.read_text("utf-8"), "utf-8")
    data_cfg = cfg.data.model_copy(update={"path": pool, "test_path": frozen, "format": "chat", "columns": {}})
    run_cfg = cfg.model_copy(update={"output_dir": out, "data": data_cfg})
    data, _ = prepare_data(run_cfg, resolve_base(cfg), progress)
    went_in = _feedback_kept(data, pool / "feedback.jsonl", new)
    version = record_version(run_cfg, data, parent=previous.hash, feedback=went_in,
                             golden=[e["completion_id"] for e in golden])
    progress(f"dataset {data.hash[:12]} from {previous.hash[:12]} + {len(went_in)} feedback rows "
             f"({len(new) - len(went_in)} removed by the data stage: {data.dir / 'removed.jsonl'}; "
             f"{len(carried) - len(kept)} earlier rows replaced by a newer correction)")
    return run_cfg, data, version


def _train_and_gate(cfg: RunConfig, run_cfg: RunConfig, data: Dataset, version: DatasetVersion,
                    golden: list[dict], result: RetrainResult, progress: Progress) -> RetrainResult:
    """Train on `data`, score on its test split and (when large enough) the golden set, register and promote
    what passes every gate."""
    from tuneloop.evaluate import evaluate

    base = resolve_base(cfg)
    progress(f"training on {data.counts['train']} rows")
    adapter = train_adapter(run_cfg, data, base)
    production = production_opponent(run_cfg, base, adapter.dir, progress)
    report = evaluate(cfg.eval, data, base, adapter, run_cfg.run_dir, production=production, judge=judge_for(cfg))
    golden_report, refusal = None, gate_refusal(report, True)
    if len(golden) >= cfg.retrain.golden_min_rows:
        golden_data = _golden_dataset(golden, data, run_cfg.run_dir / "golden", cfg.data.system_prompt)
        golden_report = evaluate(cfg.eval, golden_data, base, adapter, golden_data.dir, production=production,
                                 judge=judge_for(cfg))
        golden_refusal = gate_refusal(golden_report, True)
        refusal = refusal or (golden_refusal and f"on the production golden set: {golden_refusal}")
    else:
        progress(f"golden set: {len(golden)} rows, joins the gate at {cfg.retrain.golden_min_rows}")
    result = dataclasses.replace(result, outcome="refused", report=report, golden_report=golden_report)
    if refusal and cfg.eval.enforce_gate:
        return dataclasses.replace(result, message=refusal.replace("not registered:", "not registered or promoted:"))
    registered = register_version(run_cfg, adapter, report, data, version)
    result = dataclasses.replace(result, version=registered)
    if not cfg.eval.enforce_gate:
        return dataclasses.replace(result, message=f"registered as version {registered.version}, not promoted: "
                                   "eval.enforce_gate is false, so no retrain promotes")
    promote_version(run_cfg, registered.version, by="tuneloop retrain")
    return dataclasses.replace(result, outcome="promoted", message=f"version {registered.version} promoted to production")


def _finished_retrains(cfg: RunConfig) -> list[Path]:
    """Retrain directories that ran to an outcome, oldest first; one that failed half-way is ignored, so
    its feedback rows stay new."""
    finished = [d for d in (cfg.run_dir / RETRAINS).glob("[0-9]*") if d.name.isdigit() and (d / RETRAIN_RESULT).is_file()]
    return sorted(finished, key=lambda d: int(d.name))


def latest_dataset(cfg: RunConfig) -> Dataset:
    """The dataset of the latest finished retrain, else the run's own."""
    done = _finished_retrains(cfg)
    return load_meta(Dataset, done[-1] / "data", "retrain CONFIG") if done else load_dataset(cfg)


def _asked(messages: list[dict]) -> str:
    """What a row asks, whatever system prompt it carries: its turns before the answer."""
    return json.dumps([m for m in messages[:-1] if m["role"] != "system"], sort_keys=True, ensure_ascii=False)


def _lines(path: Path) -> list[str]:
    return path.read_text("utf-8").splitlines() if path.is_file() else []


def _feedback_kept(data: Dataset, feedback_file: Path, new: list[dict]) -> list[str]:
    """Request ids of the feedback rows the data stage kept (train or val)."""
    prefix = f"{feedback_file}:"
    lines = {int(json.loads(line)["source"].removeprefix(prefix)) for split in (data.train, data.val)
             for line in _lines(split) if json.loads(line)["source"].startswith(prefix)}
    return [e["completion_id"] for i, e in enumerate(new, start=1) if i in lines]


def _golden_dataset(rows: list[dict], data: Dataset, out: Path, system_prompt: str | None) -> Dataset:
    """The golden feedback rows as a test split beside the run's train split (for few-shot draws)."""
    from tuneloop.data.load import Row
    from tuneloop.data.split import content_hash

    out.mkdir(parents=True, exist_ok=True)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    chats = [m if m[0]["role"] == "system" else system + m for m in (r["messages"] for r in rows)]
    test = out / "golden.jsonl"
    test.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in chats), "utf-8")
    digest = content_hash([Row("", m) for m in chats])
    return dataclasses.replace(data, dir=out, test=test, split_hashes={**data.split_hashes, "test": digest},
                               counts={"test": len(chats)})


def monitor_traffic(cfg: RunConfig, window: str = "24h") -> MonitorReport:
    """`tuneloop monitor`: every served version of the config's model over the last `window` of the request
    log, against the latest dataset version, with the configured alerts."""
    from tuneloop.monitor import monitor, training_profile
    from tuneloop.registry import adapter_paths
    from tuneloop.serve.contract import served_models

    data = latest_dataset(cfg)
    chats = {name: [json.loads(line)["messages"] for line in _lines(path)]
             for name, path in (("train", data.train), ("val", data.val), ("test", data.test))}
    schema = json.loads(data.answer_schema.read_text("utf-8")) if data.answer_schema else None
    profile = training_profile(chats["train"], chats["val"] + chats["test"], schema)
    base = resolve_base(cfg)
    _, versions = served_models(base, adapter_paths(cfg.registry, base.name))
    schemas = {m.name: m.answer_schema for m in versions}
    # The version the bare name serves now should have traffic: it is reported (volume 0) even without.
    bare = next((m.path for m in versions if m.name == cfg.model_name), None)
    serving = tuple(m.name for m in versions if m.path == bare and m.name != cfg.model_name)
    return monitor(cfg.monitor, cfg.request_log_url, profile, schemas, cfg.run_dir / "monitor", window,
                   model=cfg.model_name, expected=serving)


def open_request_log(cfg: RunConfig) -> RequestLog:
    """The request log the server writes and `monitor`, feedback and `retrain` read, as the config sets it."""
    from tuneloop.serve.request_log import RequestLog

    if cfg.request_log_url.startswith("sqlite:///"):
        Path(cfg.request_log_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return RequestLog(cfg.request_log_url, cfg.monitor.sample_rate, cfg.monitor.pii, cfg.data.pii_patterns,
                      cfg.monitor.retention_days)
