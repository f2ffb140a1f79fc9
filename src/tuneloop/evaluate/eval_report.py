"""eval_report.md and a self-contained eval_report.html (opens offline: inline CSS, image as base64):
the verdict, metrics with intervals, the bar chart, confusion matrices, flips, and every test row with
the baseline's and the candidate's answers side by side, flipped rows first."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from tuneloop.artifacts import EvalReport
from tuneloop.evaluate.report import label, metric_header, metric_rows, ordered, verdict

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f3f3f3} td.answer{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12px;max-width:360px}
.fail{color:#b00020;font-weight:bold} .pass{color:#1b7f3b;font-weight:bold} img{max-width:100%}
"""


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    image: Path | None = None
    answers: bool = False  # cells hold model answers: keep their line breaks


def write_eval_report(run_dir: Path, sides: dict[str, dict], report: EvalReport) -> Path:
    """Write eval_report.md and eval_report.html into the run directory; returns the HTML file."""
    sections = _sections(sides, report, run_dir / "metrics.png")
    (run_dir / "eval_report.md").write_text(_markdown(sections), encoding="utf-8")
    path = run_dir / "eval_report.html"
    path.write_text(_html(sections), encoding="utf-8")
    return path


def _sections(sides: dict[str, dict], report: EvalReport, chart: Path) -> list[Section]:
    lines = verdict(report).splitlines()
    sections = [
        Section(
            f"Evaluation: baseline vs {report.candidate_name} on {report.rows} held-out test rows",
            [lines[0], *lines[1:], "Baseline: the base model with the same system prompt. Intervals: paired "
             "bootstrap, 95 %. Gate: the whole interval of the difference must lie above zero."],
        ),
        Section("Metrics", [*_opponent_notes(report), *_majority_note(report), *_unparsed_notes(sides)],
                header=metric_header(report),
                rows=[list(r) for r in _metric_rows_with_ci(report)]),
        Section("Chart", image=chart),
    ]
    for prefix, base_cls in sides["baseline"].get("classification", {}).items():
        cand_cls = sides["candidate"]["classification"][prefix]
        for side, cls in (("baseline", base_cls), (report.candidate_name, cand_cls)):
            sections += _classification_sections(prefix, side, cls)
    sections.append(_flip_section(report))
    sections.append(_side_by_side(sides, report))
    return sections


def _opponent_notes(report: EvalReport) -> list[str]:
    notes = {
        "production": "production: the registered version with the `production` alias, on the same rows.",
    }
    return [notes.get(name, f"{name}: the base model with solved train-split examples before each prompt.")
            for name in report.opponents]


def _majority_note(report: EvalReport) -> list[str]:
    if not report.majority:
        return []
    return ["majority class: the score of always answering the training split's most common value, on the same "
            "rows; a fine-tune that does not clear it has learned the label distribution, not the task."]


def _unparsed_notes(sides: dict[str, dict]) -> list[str]:
    """How many judgments could not be read after the retries, per side (left out of the judge means)."""
    notes = []
    for side, result in sides.items():
        counts = {m: sum(1 for r in result["rows"] if r["grades"].get(m) == 1.0)
                  for m in ("judge.unparsed", "pairwise.unparsed") if m in result["metrics"]}
        notes += [f"{side}: {n} of {len(result['rows'])} rows with an unparsed judgment ({label(m)})"
                  for m, n in counts.items()]
    return notes


def _metric_rows_with_ci(report: EvalReport) -> list[tuple[str, ...]]:
    rows = []
    for row, name in zip(metric_rows(report), ordered(report.baseline)):
        b_ci, c_ci = report.baseline_ci.get(name), (report.candidate_ci or {}).get(name)
        rows.append((row[0], _with_ci(row[1], b_ci, name), _with_ci(row[2], c_ci, name), *row[3:]))
    return rows


def _with_ci(text: str, ci: list[float] | None, name: str) -> str:
    if ci is None or name == "latency_ms" or text in ("-", "n/a"):
        return text
    return f"{text} [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]"


def _classification_sections(prefix: str, side: str, cls: dict) -> list[Section]:
    confusion = Section(
        f"Confusion matrix: {prefix}, {side}",
        [f"Rows: reference label; columns: predicted label. Accuracy {cls['accuracy'] * 100:.1f} %, "
         f"macro-F1 {cls['macro_f1'] * 100:.1f} %. A label outside the label set counts as wrong, under (invalid)."],
        header=["reference \\ predicted", *cls["columns"]],
        rows=[[name, *map(str, counts)] for name, counts in zip(cls["labels"], cls["confusion"])],
    )
    per_label = Section(
        f"Per-label precision, recall, F1: {prefix}, {side}",
        header=["label", "precision", "recall", "F1", "support"],
        rows=[[name, *(f"{v[k] * 100:.1f} %" for k in ("precision", "recall", "f1")), str(v["support"])]
              for name, v in cls["per_label"].items()],
    )
    return [confusion, per_label]


def _flip_section(report: EvalReport) -> Section:
    rows = [
        [label(m).strip(), str(len(f["fixed"])), str(len(f["broken"])),
         ", ".join(str(i + 1) for i in f["broken"]) or "-", ", ".join(str(i + 1) for i in f["fixed"]) or "-"]
        for m, f in (report.flips or {}).items()
    ]
    return Section("Flips (pass/fail metrics)", ["Rows numbered from 1 as in the table below."],
                   header=["metric", "fixed", "broken", "broken rows", "fixed rows"], rows=rows)


def _side_by_side(sides: dict[str, dict], report: EvalReport) -> Section:
    row_flips = _row_flips(report)
    gated = set(report.gate_metrics)

    def priority(i: int) -> tuple[int, int]:
        metrics = {m for _, m in row_flips.get(i, [])}
        return (0 if metrics & gated else 1 if metrics else 2, i)

    rows = []
    for i in sorted(range(len(sides["baseline"]["rows"])), key=priority):
        base, cand = sides["baseline"]["rows"][i], sides["candidate"]["rows"][i]
        flips = "; ".join(f"{kind} {label(m).strip()}" for kind, m in row_flips.get(i, [])) or "-"
        scores = ", ".join(f"{label(m).strip()} {_score(base['grades'].get(m))}→{_score(cand['grades'].get(m))}"
                           for m in report.gate_metrics if m in base["grades"] or m in cand["grades"])
        others = [sides[name]["rows"][i]["answer"] for name in report.opponents]
        rows.append([str(i + 1), flips, scores or "-", base["reference"], base["answer"], *others, cand["answer"]])
    return Section(f"Every test row, baseline and {report.candidate_name} side by side (flips first)",
                   header=["row", "flips", "gate metric b→c", "reference", "baseline", *report.opponents,
                           report.candidate_name],
                   rows=rows, answers=True)


def _row_flips(report: EvalReport) -> dict[int, list[tuple[str, str]]]:
    by_row: dict[int, list[tuple[str, str]]] = {}
    for metric, f in (report.flips or {}).items():
        for kind in ("broken", "fixed"):
            for i in f[kind]:
                by_row.setdefault(i, []).append((kind, metric))
    return by_row


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}".rstrip("0").rstrip(".")


def _markdown(sections: list[Section]) -> str:
    out = []
    for n, s in enumerate(sections):
        out += [f"{'#' if n == 0 else '##'} {s.title}", ""]
        out += [line for t in s.text for line in (t, "")]
        if s.image is not None:
            out += [f"![{s.title}]({s.image.name})", ""]
        if s.header:
            out += [_md_row(s.header), "| " + " | ".join("---" for _ in s.header) + " |"]
            out += [_md_row(r) for r in s.rows] + [""]
    return "\n".join(out)


def _md_row(cells: list[str]) -> str:
    # Escaped, so that an answer holding HTML (an <img src=...>, say) shows as text and loads nothing.
    return "| " + " | ".join(html.escape(c, quote=False).replace("|", "\\|").replace("\n", "<br>") for c in cells) + " |"


def _html(sections: list[Section]) -> str:
    body = []
    for n, s in enumerate(sections):
        tag = "h1" if n == 0 else "h2"
        body.append(f"<{tag}>{html.escape(s.title)}</{tag}>")
        body += [f"<p{_verdict_class(t)}>{html.escape(t)}</p>" for t in s.text]
        if s.image is not None and s.image.is_file():
            data = base64.b64encode(s.image.read_bytes()).decode("ascii")
            body.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}">')
        if s.header:
            cell = ' class="answer"' if s.answers else ""
            head = "".join(f"<th>{html.escape(h)}</th>" for h in s.header)
            rows = "".join(
                "<tr>" + "".join(f"<td{cell if j >= 3 else ''}>{html.escape(c)}</td>" for j, c in enumerate(r)) + "</tr>"
                for r in s.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>tuneloop evaluation</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _verdict_class(text: str) -> str:
    if text.startswith("gate FAILED"):
        return ' class="fail"'
    return ' class="pass"' if text.startswith("gate passed") else ""
