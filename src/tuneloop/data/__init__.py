"""Data stage: read -> validate -> clean (PII, quality, duplicates, test leaks) -> split -> version,
with every row accounted for: read = kept + rejected (by reason) + removed (by reason)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tuneloop.artifacts import BaseModelRef, Dataset, save_meta
from tuneloop.config import DataConfig
from tuneloop.data.clean import Removed, deduplicate, handle_pii, quality_problem
from tuneloop.data.load import Reject, Row, data_files, read_examples
from tuneloop.data.perplexity import perplexity_outliers
from tuneloop.data.pii import PiiScanner
from tuneloop.data.report import write_report
from tuneloop.data.split import content_hash, labels_of, split_rows
from tuneloop.data.validate import TokenCounter, load_schema, schema_rejects
from tuneloop.errors import TuneloopError


def prepare(cfg: DataConfig, run_dir: Path, base: BaseModelRef | None = None) -> Dataset:
    """Validate, clean and split the examples named by `cfg`, writing them under `run_dir/data`.

    With the `base` model, rows longer than its context are rejected, lengths are reported in its
    tokens, and the perplexity filter can run; without it, lengths are in words."""
    if cfg.perplexity_percentile is not None and base is None:
        raise TuneloopError("data.perplexity_percentile needs the base model to score rows; none was given")
    out = run_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    schema = load_schema(cfg.answer_schema)
    rows, given, rejects, read, token_lengths = _read_and_validate(cfg, schema, base, out)
    rows, given, removed, pii_found = _clean(cfg, base, rows, given)

    # A user-supplied validation or test file is that split; each split is versioned by its content.
    val_share = 0.0 if cfg.val_path is not None else cfg.val_fraction
    test_share = 0.0 if cfg.test_path is not None else cfg.test_fraction
    synthetic = given.pop("synthetic", [])
    # Real rows split as they would without synthetic ones, so adding those never moves a test row.
    splits = split_rows(rows, val_share, test_share, cfg.seed, labels_of(rows, cfg.label_field))
    splits.update(given)
    splits["train"] += synthetic
    if not splits["train"] or not splits["test"]:
        raise TuneloopError(
            f"{cfg.path}: {len(rows)} usable rows are too few to split into train and test; add examples"
        )
    paths = {name: out / f"{name}.jsonl" for name in splits}
    for name, split in splits.items():
        with paths[name].open("w", encoding="utf-8") as handle:  # the canonical JSON, plus the source
            handle.writelines(f'{r.canonical[:-1]},"source":{json.dumps(r.source)}}}\n' for r in split)
    _write_jsonl(
        out / "removed.jsonl", [{**_where(r.source), "reason": why, "like": like} for r, why, like in removed.rows]
    )
    split_hashes = {name: content_hash(split) for name, split in splits.items()}

    counts = {**_counts(read, rejects, removed, pii_found, splits, cfg.pii_action), "synthetic": len(synthetic)}
    lengths = {name: [token_lengths.get(r.source) or _words(r) for r in split] for name, split in splits.items()}
    unit = "tokens" if base is not None else "words (no base model given)"
    write_report(out, counts, split_hashes, lengths, unit, cfg.pii_action)
    dataset = Dataset(
        dir=out,
        train=paths["train"],
        val=paths["val"],
        test=paths["test"],
        hash=content_hash(splits["train"] + splits["val"] + splits["test"]),
        split_hashes=split_hashes,
        counts=counts,
        system_prompt=cfg.system_prompt,
        answer_schema=cfg.answer_schema if schema else None,
    )
    save_meta(dataset, out)
    return dataset


def _read_and_validate(cfg: DataConfig, schema: dict | None, base: BaseModelRef | None, out: Path):
    """Rows that pass every check (the training file's, and those of the given validation and test files
    by split), and a reject with file:line and reason for each one that does not; stops when the rejected
    share passes the configured limit."""
    read_args = (cfg.format, cfg.columns, cfg.fix_line_ends)
    rows, rejects = read_examples(cfg.path, *read_args)
    given: dict[str, list[Row]] = {}
    for split, path in _given_files(cfg).items():
        given[split], more = read_examples(path, *read_args)
        rejects += more
    read = len(rows) + sum(map(len, given.values())) + len(rejects)
    if read == 0:
        raise TuneloopError(f"{cfg.path}: no rows to read")
    rows = [_with_system_prompt(r, cfg.system_prompt) for r in rows]
    given = {split: [_with_system_prompt(r, cfg.system_prompt) for r in held] for split, held in given.items()}
    token_lengths: dict[str, int] = {}
    counter = TokenCounter(base, cfg.max_tokens) if base is not None else None
    for split in (None, *given):
        kept = rows if split is None else given[split]
        if schema is not None:
            kept, bad = schema_rejects(kept, schema)
            rejects += bad
        if counter is not None:
            kept, bad, lengths = counter.rejects(kept)
            rejects += bad
            token_lengths |= lengths
        if split is None:
            rows = kept
        else:
            given[split] = kept

    rank = {str(file): i for i, file in enumerate(input_files(cfg))}
    rejects.sort(key=lambda r: (rank[r.source.rsplit(":", 1)[0]], int(r.source.rsplit(":", 1)[1])))
    _write_jsonl(out / "rejects.jsonl", [{**_where(r.source), "reason": r.reason, "kind": r.kind} for r in rejects])
    if len(rejects) > cfg.max_reject_fraction * read:
        first = rejects[0]
        raise TuneloopError(
            f"{first.source}: {first.reason} ({len(rejects)} of {read} rows rejected, above the "
            f"{cfg.max_reject_fraction:.0%} limit; all are listed in {out / 'rejects.jsonl'})"
        )
    return rows, given, rejects, read, token_lengths


def input_files(cfg: DataConfig) -> list[Path]:
    """Every file the examples are read from: the data path's, then the validation and test files."""
    return data_files(cfg.path) + [file for path in _given_files(cfg).values() for file in data_files(path)]


def _given_files(cfg: DataConfig) -> dict[str, Path]:
    """The splits the config gives as files of their own, and the reviewed synthetic rows (train only)."""
    given = (("val", cfg.val_path), ("test", cfg.test_path), ("synthetic", cfg.synthetic_path))
    return {split: path for split, path in given if path is not None}


def _clean(cfg: DataConfig, base: BaseModelRef | None, rows: list[Row], given: dict[str, list[Row]]):
    """Personal data first, so duplicates are judged on the text that will be trained on; then
    quality filters, duplicates and test leaks, and the optional perplexity filter."""
    removed = Removed()
    pii_found: Counter[str] = Counter()
    scanner = PiiScanner(cfg.pii_patterns)
    rows = handle_pii(rows, scanner, cfg.pii_action, pii_found, removed)
    given = {split: handle_pii(kept, scanner, cfg.pii_action, pii_found, removed) for split, kept in given.items()}
    # Synthetic rows come after the real ones, so a duplicate pair keeps the real row.
    synthetic = {row.source for row in given.get("synthetic", [])}
    rows += given.pop("synthetic", [])
    kept = []
    for row in rows:
        problem = quality_problem(row, cfg.min_answer_chars, cfg.max_row_chars, cfg.drop_refusals)
        if problem is None:
            kept.append(row)
        else:
            removed.add(row, problem)
    rows, test_rows = deduplicate(kept, given.get("test", []), cfg.near_duplicate_threshold, removed)
    if "test" in given:
        given["test"] = test_rows
    if cfg.perplexity_percentile is not None:
        outliers = perplexity_outliers(rows, base, cfg.perplexity_percentile)
        for row in rows:
            if row.source in outliers:
                removed.add(row, "perplexity")
        rows = [row for row in rows if row.source not in outliers]
    if synthetic:
        given["synthetic"] = [row for row in rows if row.source in synthetic]
        rows = [row for row in rows if row.source not in synthetic]
    return rows, given, removed, pii_found


def _counts(
    read: int, rejects: list[Reject], removed: Removed, pii_found: Counter[str], splits: dict, pii_action: str
) -> dict:
    by_reason = removed.counts()
    counts = {
        "read": read,
        "rejected": len(rejects),
        "duplicates_removed": by_reason["exact_duplicate"] + by_reason["near_duplicate"],
        "test_leaks_removed": by_reason["test_leak"],
        **{name: len(split) for name, split in splits.items()},
        "exact_duplicates_removed": by_reason["exact_duplicate"],
        "near_duplicates_removed": by_reason["near_duplicate"],
        "removed": len(removed.rows),
        "rejected_by_reason": dict(sorted(Counter(r.kind for r in rejects).items())),
        "removed_by_reason": dict(sorted(by_reason.items())),
        "pii_found_by_kind": dict(sorted(pii_found.items())),
        "pii_redacted_by_kind": dict(sorted(pii_found.items())) if pii_action == "redact" else {},
    }
    kept = counts["train"] + counts["val"] + counts["test"]
    assert read == kept + counts["rejected"] + counts["removed"], counts  # every row accounted for
    return counts


def _with_system_prompt(row: Row, system_prompt: str | None) -> Row:
    if system_prompt is None or row.messages[0]["role"] == "system":
        return row
    return Row(row.source, [{"role": "system", "content": system_prompt}, *row.messages], row.rejected)


def _where(source: str) -> dict:
    file, line = source.rsplit(":", 1)
    return {"file": file, "line": int(line), "source": source}


def _words(row: Row) -> int:
    return sum(len(m["content"].split()) for m in row.messages)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


__all__ = ["input_files", "prepare"]
