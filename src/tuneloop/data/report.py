"""`data_report.md` and `lengths.png`: every count of the data stage, and how long the rows are."""

from __future__ import annotations

from pathlib import Path


def write_report(
    out: Path, counts: dict, split_hashes: dict[str, str], lengths: dict[str, list[int]], unit: str, pii_action: str
) -> None:
    lines = [
        "# Data report",
        "",
        f"Read {counts['read']} rows: kept {counts['train'] + counts['val'] + counts['test']}, "
        f"rejected {counts['rejected']}, removed {counts['removed']}.",
        "",
        "| split | rows | content hash (SHA-256) |",
        "|---|---:|---|",
        *(f"| {name} | {counts[name]} | `{split_hashes[name]}` |" for name in ("train", "val", "test")),
        "",
        *([f"The train split holds {counts['synthetic']} reviewed synthetic rows (never in val or test).", ""]
          if counts.get("synthetic") else []),
        *_table("Rejected, by reason (each row is in `rejects.jsonl`)", "reason", counts["rejected_by_reason"]),
        *_table("Removed, by reason (each row is in `removed.jsonl`)", "reason", counts["removed_by_reason"]),
        *_table(f"Personal data and secrets found (action: {pii_action})", "kind", counts["pii_found_by_kind"]),
        "## Lengths",
        "",
        f"In {unit}; histogram per split in `lengths.png`.",
        "",
        "| split | min | median | max |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {min(v)} | {sorted(v)[len(v) // 2]} | {max(v)} |" if v else f"| {name} | - | - | - |"
            for name, v in lengths.items()
        ),
        "",
    ]
    (out / "data_report.md").write_text("\n".join(lines), encoding="utf-8")
    _plot(lengths, unit, out / "lengths.png")


def _table(title: str, key_name: str, counts: dict[str, int]) -> list[str]:
    if not counts:
        return [f"## {title}", "", "None.", ""]
    rows = [f"| {key} | {n} |" for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return [f"## {title}", "", f"| {key_name} | count |", "|---|---:|", *rows, ""]


def _plot(lengths: dict[str, list[int]], unit: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in lengths.items():
        if values:
            ax.hist(values, bins=40, alpha=0.5, label=f"{name} ({len(values)})", density=True)
    ax.set_xlabel(f"row length ({unit})")
    ax.set_ylabel("share of rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
