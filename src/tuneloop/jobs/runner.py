"""One phase of one job, in a process of its own that a worker starts and watches:
`python -m tuneloop.jobs.runner CONFIG JOB_ID PHASE WORKER`.

`validate` runs the data stage on the job's files: too many bad rows fail the job with their line
numbers; otherwise the rejected lines are listed in an event and the job is queued for training.
`train` runs the loop (`pipeline.run`): progress and each logged step become events, each validation a
checkpoint; a fine-tune that passes the gate (or any, where the gate is not enforced) is registered as
`ft:<base>:<project>:<suffix>:<job id>` and the job succeeds; one that fails it fails the job."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

from tuneloop.config import RunConfig, load_config
from tuneloop.errors import TuneloopError
from tuneloop.jobs.config import fine_tuned_name, job_config
from tuneloop.jobs.store import JobStore, store_url
from tuneloop.jobs.worker import die_with_parent

LISTED_REJECTS = 20  # rejected lines named in an event or error message; the rest are counted


def main(argv: list[str]) -> int:
    config_file, job_id, phase, worker = argv
    die_with_parent()
    cfg = load_config(Path(config_file))
    threads = int(os.environ.get("TUNELOOP_THREADS", "0"))
    if threads:
        import torch

        torch.set_num_threads(threads)
    store = JobStore(store_url(cfg.api.database_url, cfg.jobs_dir))
    job = store.job(job_id)
    if job is None:
        return 0
    run = PhaseRun(cfg, store, job, worker)
    try:
        run.materialize()
        run.validate() if phase == "validate" else run.train()
    except TuneloopError as err:
        training = run.job["status"] == "running"
        run.fail("training_failed" if training else "invalid_training_file", run.shown(str(err)),
                 None if training else "training_file")
    except Exception as err:  # noqa: BLE001 - the job must end failed, with the reason, whatever went wrong
        traceback.print_exc()
        run.fail("internal_error", f"{type(err).__name__}: {str(err)[:500]} (the traceback is in the worker's log)")
    return 0


class PhaseRun:
    def __init__(self, cfg: RunConfig, store: JobStore, job: dict, worker: str):
        self.store, self.job, self.worker = store, job, worker
        self.names: dict[str, str] = {}  # file path -> the name the client uploaded it under
        self.server_cfg = cfg
        self.run_dir = cfg.jobs_dir / "runs" / job["id"]
        self.files: dict[str, Path] = {}

    def materialize(self) -> None:
        """Write the job's files into its run directory; the job's configuration points at them."""
        folder = self.run_dir / "files"
        folder.mkdir(parents=True, exist_ok=True)
        self.files["training_file"] = self._materialize(self.job["training_file"], folder)
        if self.job["validation_file"]:
            self.files["validation_file"] = self._materialize(self.job["validation_file"], folder)
        self.cfg = job_config(self.server_cfg, self.job, self.run_dir, self.files["training_file"],
                              self.files.get("validation_file"))

    def _materialize(self, file_id: str, folder: Path) -> Path:
        stored = self.store.file(file_id, self.job["project"], content=True)
        if stored is None:
            raise TuneloopError(f"file {file_id} was deleted before the job ran")
        path = folder / f"{file_id}.jsonl"
        path.write_bytes(stored["content"])
        self.names[str(path)] = f"{stored['filename']} ({file_id})"
        return path

    def shown(self, text: str) -> str:
        """`text` with the job's file paths replaced by the names the client uploaded them under."""
        for path, name in self.names.items():
            text = text.replace(f"{path}:", f"{name} line ").replace(path, name)
        return text

    def event(self, message: str, level: str = "info", kind: str = "message", data: dict | None = None) -> None:
        self.store.add_event(self.job["id"], self.shown(message), level, kind, _finite(data))

    def fail(self, code: str, message: str, param: str | None = None) -> None:
        error = {"code": code, "message": message, "param": param}
        if self.store.update(self.job["id"], {"status": ("validating_files", "running"), "worker": self.worker},
                             status="failed", error=error, finished_at=int(time.time()), worker=None):
            self.event(f"Job failed: {message}", level="error")

    def validate(self) -> None:
        from tuneloop import pipeline

        self.event("Validating training file: " + ", ".join(self.names.values()) + f" (worker {self.worker})")
        try:
            data, _ = pipeline.prepare_data(self.cfg)
        except TuneloopError as err:
            param = self._file_of_first_reject() or "training_file"
            lines = self._rejected_lines()
            self.fail(f"invalid_{param}", self.shown(str(err)) + (f". Rejected lines: {lines}" if lines else ""), param)
            return
        c = data.counts
        self.event(f"Files validated: {c['read']} rows read, {c['rejected']} rejected, "
                   f"{c['duplicates_removed']} duplicates removed", data={"counts": _ints(c)})
        if c["rejected"]:
            self.event(f"Rejected lines (left out of training): {self._rejected_lines()}", level="warn")
        self.event(f"Test split: {c['test']} rows of the training file held out for the evaluation "
                   f"({self.cfg.data.test_fraction:.0%}, seed {self.cfg.data.seed}); validation: {c['val']} rows"
                   + (" from the validation file" if self.job["validation_file"] else " of the training file"))
        if not self.store.update(self.job["id"], {"status": "validating_files", "worker": self.worker},
                                 status="queued", worker=None, heartbeat=None):
            return  # cancelled meanwhile
        self.event("Job queued for training")
        # This worker holds a slot for the job already: it trains it now, in this process, unless another
        # took it first. (A job queued again after a lost worker goes through the queue.)
        if self.store.claim(self.job["id"], "queued", "running", self.worker):
            self.job = self.store.job(self.job["id"])
            self.train()

    def _rejects(self) -> list[dict]:
        path = self.run_dir / "data" / "rejects.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []

    def _rejected_lines(self) -> str:
        rejects = self._rejects()
        listed = "; ".join(f"{self.shown(r['file'])} line {r['line']}: {r['reason']}" for r in rejects[:LISTED_REJECTS])
        more = len(rejects) - LISTED_REJECTS
        return listed + (f"; and {more} more" if more > 0 else "")

    def _file_of_first_reject(self) -> str | None:
        rejects = self._rejects()
        if not rejects:
            return None
        return next((param for param, path in self.files.items() if str(path) == rejects[0]["file"]), None)

    def train(self) -> None:
        from tuneloop import pipeline
        from tuneloop.train import SAVED

        job_id = self.job["id"]
        resume = self.job["attempts"] > 1
        self.event(f"Fine-tuning job started on worker {self.worker}" + (f" again (attempt {self.job['attempts']}), from its newest "
                                                "checkpoint where it has one" if resume else ""))
        last_loss: list[float] = []
        validated: dict[int, float] = {}  # step -> validation loss, until the step's checkpoint is saved

        def on_log(step: int, total: int, logs: dict) -> None:
            if "loss" in logs:
                last_loss[:] = [float(logs["loss"])]
                data = {"step": step, "total_steps": total, "train_loss": float(logs["loss"])}
                data |= {k: float(logs[k]) for k in ("learning_rate", "epoch") if k in logs}
                self.event(f"Step {step}/{total}: training loss={logs['loss']:.4f}", kind="metrics", data=data)
            if logs.get(SAVED) and step in validated:
                # Listed only once its files are on disk: a worker killed before then resumes from the one before.
                loss = validated.pop(step)
                self.store.add_checkpoint(job_id, step, {"step": step, "train_loss": last_loss[0] if last_loss else None,
                                                         "valid_loss": loss, "full_valid_loss": loss})
            if "eval_loss" in logs:
                loss = validated[step] = float(logs["eval_loss"])
                self.event(f"Step {step}/{total}: validation loss={loss:.4f}", kind="metrics",
                           data={"step": step, "total_steps": total, "valid_loss": loss, "full_valid_loss": loss})

        name = fine_tuned_name(self.job)
        result = pipeline.run(self.cfg, progress=self.event, on_train_log=on_log, resume=resume, served_name=name)
        report = result.report
        results_file = self.store.add_file(self.job["project"], "step_metrics.csv", "fine-tune-results",
                                           _step_metrics_csv(result.adapter.history))
        self.event(_verdict(report, self.cfg.eval.enforce_gate),
                   level="info" if report.gate_passed or not self.cfg.eval.enforce_gate else "error",
                   data={"baseline": report.baseline, "fine_tuned": report.candidate, "difference": report.difference,
                         "gate_passed": report.gate_passed, "gate_enforced": self.cfg.eval.enforce_gate})
        if result.version is None:
            failures = "; ".join(report.gate_failures)
            self.store.update(job_id, {"status": "running", "worker": self.worker}, result_files=[results_file["id"]])
            self.fail("gate_failed", f"the fine-tune did not beat the baseline on {report.rows} held-out test rows: "
                      f"{failures}. The report: {report.html_report or report.dir}")
            return
        if self.store.update(job_id, {"status": "running", "worker": self.worker}, status="succeeded",
                             fine_tuned_model=name, finished_at=int(time.time()), worker=None,
                             trained_tokens=result.adapter.train_tokens, result_files=[results_file["id"]]):
            self.event(f"New fine-tuned model created: {name}")
            self.event("The job has successfully completed")


def _verdict(report, enforced: bool) -> str:
    lines = []
    for metric in report.gate_metrics or list(report.candidate or {}):
        diff = (report.difference or {}).get(metric)
        if diff is None:
            continue
        lines.append(f"{metric} {report.baseline.get(metric, float('nan')):.3f} -> "
                     f"{(report.candidate or {}).get(metric, float('nan')):.3f} "
                     f"(difference {diff[0]:+.3f}, 95 % CI [{diff[1]:+.3f}, {diff[2]:+.3f}])")
    scored = f"Evaluation on {report.rows} held-out test rows, baseline -> fine-tune: " + "; ".join(lines)
    if not enforced:
        verdict = "passed" if report.gate_passed else "failed"
        return f"{scored}. Gate {verdict}, not enforced (eval.enforce_gate is false)"
    return f"{scored}. Gate {'passed' if report.gate_passed else 'failed'}"


def _step_metrics_csv(history: list[dict]) -> bytes:
    columns = ["step", *sorted({k for entry in history for k in entry} - {"step"})]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue().encode()


def _finite(value):
    """`value` with NaN and infinities as None: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _ints(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if isinstance(v, int)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))
