"""report.md, metrics.png, the verdict and the side-by-side table printed at the end of a run."""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from tuneloop.artifacts import Adapter, EvalReport

LABELS = {
    "json_valid": "JSON validity",
    "schema_valid": "schema compliance",
    "field_accuracy": "per-field accuracy (mean)",
    "rouge_l": "ROUGE-L",
    "bleu": "BLEU",
    "chrf": "chrF",
    "embedding_similarity": "embedding cosine similarity",
    "exact_match": "exact match",
    "normalized_match": "normalised match",
    "regex": "regex match",
    "judge": "LLM judge, 1-5 rubric as (score - 1) / 4",
    "judge.unparsed": "LLM judge: unparsed judgments",
    "pairwise": "pairwise win rate vs the baseline (ties ½)",
    "pairwise.unparsed": "pairwise: unparsed judgments",
    "latency_ms": "mean latency (ms/row, batched)",
}


def label(name: str) -> str:
    """The display name of a metric."""
    if name.startswith("field."):
        return f"  accuracy: {name.removeprefix('field.')}"
    if name in LABELS:
        return LABELS[name]
    if name.endswith(".accuracy") or name.endswith(".macro_f1"):
        prefix, _, kind = name.rpartition(".")
        return f"{prefix}: {'label accuracy' if kind == 'accuracy' else 'macro-F1'}"
    return LABELS.get(name, name)


def ordered(names: list[str] | dict) -> list[str]:
    """Metrics in display order: whole-answer metrics, per-field accuracies, labels, latency last."""
    names = list(names)
    rank = {m: i for i, m in enumerate(LABELS)}

    def key(name: str) -> tuple[int, int, str]:
        if name == "latency_ms":
            return (3, 0, "")
        if name.startswith("field."):
            return (0, rank["field_accuracy"], name)
        if "." in name and name not in rank:
            return (1, 0, name)
        return (0, rank.get(name, 99), "") if rank.get(name, 99) <= rank["field_accuracy"] else (2, rank.get(name, 99), name)

    return sorted(names, key=key)


def metric_header(report: EvalReport) -> list[str]:
    """Column names of `metric_rows`: two more columns for each further opponent."""
    extra = [column for name in report.opponents for column in (name, f"Δ vs {name} [95 % CI]")]
    majority = ["majority class"] if report.majority else []
    return ["metric", "baseline", report.candidate_name, "Δ", "95 % CI of Δ", *extra, *majority, "gate"]


def metric_rows(report: EvalReport) -> list[tuple[str, ...]]:
    """(metric, baseline, candidate, difference, 95 % CI of the difference, [each further opponent and the
    difference to it], [the majority-class rate, where a metric has one], gate) per metric."""
    rows = []
    for name in ordered(report.baseline):
        b = report.baseline.get(name)
        c = None if report.candidate is None else report.candidate.get(name)
        ci = _fmt_ci(name, (report.difference or {}).get(name))
        rows.append((label(name), _fmt(name, b), _fmt(name, c), _fmt_delta(name, b, c), ci,
                     *_opponent_cells(report, name), *_majority_cell(report, name), _gate_mark(report, name)))
    return rows


def _opponent_cells(report: EvalReport, name: str) -> list[str]:
    cells = []
    for side, values in report.opponents.items():
        diff = report.opponent_difference.get(side, {}).get(name)
        delta = "-" if diff is None else f"{_fmt_delta(name, 0.0, diff[0])} {_fmt_ci(name, diff)}"
        cells += [_fmt(name, values.get(name)), delta]
    return cells


def _majority_cell(report: EvalReport, name: str) -> list[str]:
    if not report.majority:
        return []
    return [_fmt(name, report.majority[name]) if name in report.majority else ""]


def _fmt_ci(name: str, diff: list[float] | None) -> str:
    return "-" if diff is None else f"[{_fmt_delta(name, 0.0, diff[1])}, {_fmt_delta(name, 0.0, diff[2])}]"


def _gate_mark(report: EvalReport, name: str) -> str:
    if name not in report.gate_metrics:
        return ""
    if report.gate_passed is None:
        return "gate"
    return "gate: fail" if any(f.startswith(f"{name}:") for f in report.gate_failures) else "gate: pass"


def verdict(report: EvalReport) -> str:
    """One line per outcome: promoted, or refused with each failing metric and by how much."""
    if report.gate_passed is None:
        return "gate: no candidate to judge (baseline only)"
    if report.gate_passed:
        gains = ", ".join(f"{m} {_fmt_delta(m, 0.0, report.difference[m][0])}" for m in report.gate_metrics)
        opponents = " and ".join(["the baseline", *(f"the {name}" for name in report.opponents)])
        return f"gate passed: {report.candidate_name} beats {opponents} with 95 % confidence on {gains}"
    return "gate FAILED, not promoted:\n" + "\n".join(f"  - {f}" for f in report.gate_failures)


def comparison_table(report: EvalReport) -> Table:
    table = Table(title=f"baseline vs {report.candidate_name} on {report.rows} held-out test rows")
    header = metric_header(report)
    for i, column in enumerate(header):
        table.add_column("" if column == "gate" else column, justify="left" if i in (0, len(header) - 1) else "right")
    for row in metric_rows(report):
        table.add_row(*row)
    return table


def write_report(
    run_dir: Path,
    rows: list[dict],
    sides: dict[str, dict],
    report: EvalReport,
    adapter: Adapter | None,
) -> Path:
    """report.md and metrics.png: the run summary with the verdict, metrics and a few examples."""
    _plot_metrics(report, run_dir / "metrics.png")
    lines = [
        "# tuneloop run report",
        "",
        f"{len(rows)} held-out test rows, never trained on. Baseline: the base model with the same system prompt.",
        "",
        f"**{verdict(report).splitlines()[0]}**",
        *verdict(report).splitlines()[1:],
        "",
        f"| {' | '.join(metric_header(report))} |",
        "| --- | " + "---: | " * (len(metric_header(report)) - 2) + "--- |",
        *[f"| {' | '.join(r).strip()} |" for r in metric_rows(report)],
        "",
        f"![baseline vs {report.candidate_name}](metrics.png)",
        "",
        "Every test row side by side, confusion matrices and flips: `eval_report.html` / `eval_report.md`.",
        "",
    ]
    if adapter is not None:
        val = f"{adapter.val_loss:.4f}" if adapter.val_loss is not None else "n/a"
        lines += [
            "## Training",
            "",
            f"Base model `{adapter.base_model}`, method `{adapter.method}`, dataset `{adapter.dataset_hash[:12]}`.",
            f"Final train loss {adapter.train_loss:.4f}, validation loss {val}, "
            f"{adapter.train_tokens:,} tokens in {adapter.train_seconds:.0f} s "
            f"({adapter.train_tokens / max(adapter.train_seconds, 1e-9):,.0f} tokens/s).",
            "",
            "![loss](loss.png)",
            "",
        ]
    lines += ["## Examples (first 5 test rows)", ""]
    for base_row, cand_row in list(zip(sides["baseline"]["rows"], sides["candidate"]["rows"]))[:5]:
        lines += [
            f"**{base_row['source']}**",
            "",
            f"- reference: `{_one_line(base_row['reference'])}`",
            f"- baseline: `{_one_line(base_row['answer'])}`",
            f"- {report.candidate_name}: `{_one_line(cand_row['answer'])}`",
            "",
        ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _plot_metrics(report: EvalReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidate = report.candidate or {}
    names = [m for m in ordered(report.baseline) if m != "latency_ms" and m in candidate]
    sides = [
        ("baseline", report.baseline, report.baseline_ci),
        *((name, values, report.opponent_ci.get(name, {})) for name, values in report.opponents.items()),
        (report.candidate_name, candidate, report.candidate_ci or {}),
    ]
    palette = ["#dd8452", "#55a868", "#8172b3", "#c44e52"]
    colors = ["#999999", *(palette[k % len(palette)] for k in range(len(sides) - 2)), "#4c72b0"]
    width = 0.8 / len(sides)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.45 * len(sides)), 4.5), dpi=100)
    for k, ((side, values, ci), color) in enumerate(zip(sides, colors)):
        offset = (k - (len(sides) - 1) / 2) * width
        heights = [_finite(values.get(m, math.nan)) * 100 for m in names]
        errors = [[max(h - _finite(ci.get(m, [v, v])[0]) * 100, 0), max(_finite(ci.get(m, [v, v])[1]) * 100 - h, 0)]
                  for m, h, v in zip(names, heights, (values.get(n, math.nan) for n in names))]
        ax.bar([i + offset for i in x], heights, width=width, label=side, color=color,
               yerr=list(zip(*errors)) if errors else None, capsize=3, error_kw={"elinewidth": 1})
    ax.set_xticks(list(x), [label(m).strip() for m in names], rotation=30, ha="right")
    ax.set_ylabel("% (whiskers: 95 % bootstrap CI)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{report.rows} held-out test rows: {', '.join(side for side, _, _ in sides)}")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "n/a"
    return f"{value:,.0f}" if name == "latency_ms" else f"{value * 100:.1f} %"


def _fmt_delta(name: str, b: float | None, c: float | None) -> str:
    if b is None or c is None:
        return "-"
    if not (math.isfinite(b) and math.isfinite(c)):
        return "n/a"
    return f"{c - b:+,.0f}" if name == "latency_ms" else f"{(c - b) * 100:+.1f} pts"


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split()).replace("`", "'")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
