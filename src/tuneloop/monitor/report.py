"""monitor_report.html: one self-contained page (inline CSS, charts as base64 PNG) with the alerts, a
table of every served version's figures, and per version its length and label distributions against the
training data."""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tuneloop.monitor.quality import TrainingProfile

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px} th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left} .alert{color:#b00020;font-weight:bold}
.ok{color:#1b7f3b} img{max-width:100%}
"""
COLUMNS = [
    ("requests", "volume", "{:d}"), ("error rate", "error_rate", "{:.1%}"), ("p50 ms", "latency_p50_ms", "{:.0f}"),
    ("p95 ms", "latency_p95_ms", "{:.0f}"), ("schema valid", "schema_valid", "{:.1%}"),
    ("refusals", "refusal_share", "{:.1%}"), ("prompt tokens", "prompt_tokens", "{:d}"),
    ("completion tokens", "completion_tokens", "{:d}"),
]


def write_monitor_report(out: Path, versions: dict[str, dict[str, Any]], profile: TrainingProfile,
                         alerts: list[dict[str, Any]], since: float, until: float) -> Path:
    """Write `out/monitor_report.html`; returns its path."""
    parts = [f"<h1>Live traffic, {_time(since)} to {_time(until)}</h1>"]
    if alerts:
        parts.append("<h2 class=alert>Alerts</h2><ul>" + "".join(
            f"<li class=alert>{html.escape(a['message'])}</li>" for a in alerts) + "</ul>")
    else:
        parts.append("<p class=ok>No alert fired.</p>")
    parts.append(_table(versions))
    for version, stats in versions.items():
        parts.append(f"<h2>{html.escape(version)}</h2>")
        parts.append(f"<p>{html.escape(_drift_text(stats['drift']))}</p>")
        parts.append(f'<img alt="distributions of {html.escape(version)}" src="data:image/png;base64,'
                     f'{_chart(stats, profile)}">')
    path = out / "monitor_report.html"
    path.write_text(f"<!doctype html><html><head><meta charset=utf-8><title>tuneloop monitor</title>"
                    f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>", encoding="utf-8")
    return path


def _table(versions: dict[str, dict[str, Any]]) -> str:
    head = "".join(f"<th>{name}</th>" for name, _, _ in COLUMNS)
    rows = []
    for version, stats in versions.items():
        cells = "".join(f"<td>{_format(stats.get(key), fmt)}</td>" for _, key, fmt in COLUMNS)
        drift = "drifted" if stats["drift"]["drifted"] else "no drift" if stats["drift"]["reason"] is None else "not tested"
        rows.append(f"<tr><td>{html.escape(version)}</td>{cells}<td>{drift}</td></tr>")
    return f"<table><tr><th>version</th>{head}<th>input drift</th></tr>{''.join(rows)}</table>"


def _format(value: Any, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def _drift_text(drift: dict[str, Any]) -> str:
    if drift["reason"] is not None:
        return f"Input drift: {drift['reason']}."
    verdict = "drifted" if drift["drifted"] else "no drift detected"
    return (f"Input drift against {drift['reference_size']} held-out prompts ({drift['live_size']} live): "
            f"{verdict} at a false-alarm rate of {drift['alpha']:g} (embeddings p = {drift['embedding_p_value']:.3g}, "
            f"lengths p = {drift['length_p_value']:.3g}, Bonferroni-adjusted).")


def _chart(stats: dict[str, Any], profile: TrainingProfile) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(stats["labels"].items())
    fig, axes = plt.subplots(1, 2 + len(labels), figsize=(5 * (2 + len(labels)), 3.4), squeeze=False)
    for ax, key, training in ((axes[0][0], "prompt_length", profile.prompts),
                              (axes[0][1], "answer_length", profile.answers)):
        ax.hist([len(t) for t in training], bins=30, density=True, alpha=0.5, label="training")
        if stats[key]["live"]:
            ax.hist(stats[key]["live"], bins=30, density=True, alpha=0.5, label="live")
        ax.set_title(f"{key.replace('_', ' ')} (characters)")
        ax.legend()
    for ax, (field, shares) in zip(axes[0][2:], labels):
        names = list(shares["training"])
        positions = range(len(names))
        ax.bar([p - 0.2 for p in positions], [shares["training"][n] or 0 for n in names], 0.4, label="training")
        ax.bar([p + 0.2 for p in positions], [shares["live"][n] or 0 for n in names], 0.4, label="live")
        ax.set_xticks(list(positions), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"labels: {field or 'answer'}")
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
