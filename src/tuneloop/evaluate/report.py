"""report.md, metrics.png and the side-by-side table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from tuneloop.artifacts import Adapter, EvalReport

LABELS = {
    "json_valid": "JSON validity",
    "schema_valid": "schema compliance",
    "field_accuracy": "per-field accuracy (mean)",
    "rouge_l": "ROUGE-L",
    "exact_match": "exact match",
    "latency_ms": "mean latency (ms/row, batched)",
}


def metric_rows(baseline: dict[str, float], candidate: dict[str, float] | None) -> list[tuple[str, str, str, str]]:
    """(label, baseline, fine-tuned, difference) for each metric, in display order."""
    order = [m for m in LABELS if m in baseline and m != "latency_ms"]
    order += [m for m in baseline if m.startswith("field.")]
    order += ["latency_ms"]
    rows = []
    for name in order:
        label = LABELS.get(name, f"  accuracy: {name.removeprefix('field.')}")
        b = baseline.get(name)
        c = None if candidate is None else candidate.get(name)
        rows.append((label, _fmt(name, b), _fmt(name, c), _fmt_delta(name, b, c)))
    return rows


def comparison_table(report: EvalReport) -> Table:
    table = Table(title=f"baseline vs fine-tuned on {report.rows} held-out test rows")
    for column, justify in (("metric", "left"), ("baseline", "right"), ("fine-tuned", "right"), ("Δ", "right")):
        table.add_column(column, justify=justify)
    for row in metric_rows(report.baseline, report.candidate):
        table.add_row(*row)
    return table


def write_report(run_dir: Path, rows: list[dict], baseline: dict, candidate: dict, adapter: Adapter | None) -> Path:
    _plot_metrics(baseline["metrics"], candidate["metrics"], run_dir / "metrics.png")
    lines = [
        "# tuneloop run report",
        "",
        f"{len(rows)} held-out test rows, never trained on. Baseline: the base model with the same system prompt.",
        "",
        "| metric | baseline | fine-tuned | Δ |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {' | '.join(r).strip()} |" for r in metric_rows(baseline["metrics"], candidate["metrics"])],
        "",
        "![baseline vs fine-tuned](metrics.png)",
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
    for base_row, cand_row in list(zip(baseline["rows"], candidate["rows"]))[:5]:
        lines += [
            f"**{base_row['source']}**",
            "",
            f"- reference: `{_one_line(base_row['reference'])}`",
            f"- baseline: `{_one_line(base_row['answer'])}`",
            f"- fine-tuned: `{_one_line(cand_row['answer'])}`",
            "",
        ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _plot_metrics(baseline: dict[str, float], candidate: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in baseline if m != "latency_ms" and m in candidate]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 4), dpi=100)
    ax.bar([i - 0.2 for i in x], [baseline[m] * 100 for m in names], width=0.4, label="baseline", color="#999999")
    ax.bar([i + 0.2 for i in x], [candidate[m] * 100 for m in names], width=0.4, label="fine-tuned", color="#4c72b0")
    ax.set_xticks(list(x), [LABELS.get(m, m.removeprefix("field.")) for m in names], rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("Baseline vs fine-tuned on held-out test rows")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if name == "latency_ms" else f"{value * 100:.1f} %"


def _fmt_delta(name: str, b: float | None, c: float | None) -> str:
    if b is None or c is None:
        return "-"
    return f"{c - b:+,.0f}" if name == "latency_ms" else f"{(c - b) * 100:+.1f} pts"


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split()).replace("`", "'")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
