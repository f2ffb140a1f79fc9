"""Monitor stage: reads what the server logged and says how each served version does on live traffic,
against its training data, raising the alerts the config asks for."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.artifacts import MonitorReport, save_meta
from tuneloop.config import MonitorConfig, parse_duration
from tuneloop.data.feedback import served_names
from tuneloop.monitor.alerts import drift_alerts, fired, post_webhook
from tuneloop.monitor.drift import MIN_PROMPTS, input_drift, prompt_embeddings, prompt_length
from tuneloop.monitor.quality import TrainingProfile, last_user_message, training_profile, version_quality
from tuneloop.monitor.report import write_monitor_report
from tuneloop.serve.request_log import connect, read_requests


def monitor(
    cfg: MonitorConfig,
    log_url: str,
    profile: TrainingProfile,
    schemas: dict[str, dict | None],
    out: Path,
    window: str = "24h",
    now: float | None = None,
    model: str | None = None,
    expected: tuple[str, ...] = (),
) -> MonitorReport:
    """Figures per served version over the last `window` of the request log at `log_url`, compared with
    `profile` (the training data) and each version's answer schema (`schemas`, by version name); the alert
    rules over their own windows; the report as `out/monitor_report.html`, alerts also to the webhook.
    With `model`, only its versions (`<model>` and `<model>-v<N>`) are looked at: a log holds the traffic of
    every model a server serves. The `expected` versions are reported even without traffic (volume 0)."""
    now = time.time() if now is None else now
    spans = {window: parse_duration(window), **{r.window: parse_duration(r.window) for r in cfg.alerts}}
    rows = read_requests(connect(log_url), since=now - max(spans.values()), until=now)
    if model is not None:
        own = served_names(model)
        rows = [row for row in rows if own.fullmatch(row["version"])]
    drift = _DriftCheck(profile, cfg.drift_false_alarm_rate, rows)
    figures = {name: _by_version(rows, now - seconds, schemas, profile, drift, expected)
               for name, seconds in spans.items()}

    alerts = [alert for rule in cfg.alerts for alert in fired(rule, figures[rule.window])]
    if cfg.alert_on_drift:
        alerts += drift_alerts(figures[window], window)
    out.mkdir(parents=True, exist_ok=True)
    html = write_monitor_report(out, figures[window], profile, alerts, now - spans[window], now)
    report = MonitorReport(since=now - spans[window], until=now, window=window, versions=_summary(figures[window]),
                           alerts=alerts, html=html)
    if alerts and cfg.webhook_url:
        payload = {"alerts": alerts, "window": window, "since": report.since, "until": now, "report": str(html)}
        report = dataclasses.replace(report, webhook_error=post_webhook(cfg.webhook_url, payload))
    save_meta(report, out)
    return report


class _DriftCheck:
    """Input drift of a version's sampled prompts against the held-out prompts; every prompt is embedded
    once, whichever windows it falls in."""

    def __init__(self, profile: TrainingProfile, alpha: float, rows: list[dict[str, Any]]):
        self.alpha, self.profile = alpha, profile
        texts = {r["id"]: last_user_message(r["prompt"]) for r in rows if r["prompt"] is not None}
        self.texts, self._vectors, self._reference = texts, None, None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [r["id"] for r in rows if r["id"] in self.texts]
        reference = self.profile.held_out_prompts
        reference_lengths = [prompt_length(p) for p in reference]
        live_lengths = [prompt_length(self.texts[i]) for i in ids]
        if min(len(ids), len(reference)) < MIN_PROMPTS:  # too few to test: no embeddings needed
            empty = np.zeros((0, 1))
            result = input_drift(empty, empty, [], [], self.alpha)
            reason = (f"not tested: needs at least {MIN_PROMPTS} prompts on each side, got {len(reference)} "
                      f"held-out and {len(ids)} live")
            return dataclasses.replace(result, reference_size=len(reference), live_size=len(ids), reason=reason).__dict__
        if self._vectors is None:
            order = list(self.texts)
            self._vectors = dict(zip(order, prompt_embeddings([self.texts[i] for i in order])))
            self._reference = prompt_embeddings(reference)
        live = np.stack([self._vectors[i] for i in ids])
        return input_drift(self._reference, live, reference_lengths, live_lengths, self.alpha).__dict__


def _by_version(rows, since: float, schemas, profile: TrainingProfile, drift: _DriftCheck,
                expected: tuple[str, ...]) -> dict[str, dict]:
    grouped: dict[str, list[dict]] = {version: [] for version in expected}
    for row in rows:
        if row["created"] >= since:
            grouped.setdefault(row["version"], []).append(row)
    figures = {}
    for version in sorted(grouped):
        stats = version_quality(grouped[version], schemas.get(version), profile)
        stats["drift"] = {k: None if isinstance(v, float) and math.isnan(v) else v
                          for k, v in drift(grouped[version]).items()}
        p_values = [stats["drift"]["embedding_p_value"], stats["drift"]["length_p_value"]]
        # Bonferroni over the two views, so `drift_p_value below <rate>` fires at the stated false-alarm rate.
        stats["drift_p_value"] = None if None in p_values else min(1.0, 2 * min(p_values))
        figures[version] = stats
    return figures


def _summary(figures: dict[str, dict]) -> dict[str, dict]:
    """The figures without the per-request length lists the charts are drawn from."""
    def trimmed(stats: dict) -> dict:
        return {**stats, "prompt_length": _no_list(stats["prompt_length"]),
                "answer_length": _no_list(stats["answer_length"])}

    return {version: trimmed(stats) for version, stats in figures.items()}


def _no_list(lengths: dict) -> dict:
    return {k: v for k, v in lengths.items() if k != "live"}


__all__ = ["TrainingProfile", "monitor", "training_profile"]
