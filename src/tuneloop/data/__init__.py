"""Data stage: read -> validate -> drop exact duplicates -> split -> write, with every row accounted for."""

from __future__ import annotations

import json
from pathlib import Path

from tuneloop.artifacts import Dataset, save_meta
from tuneloop.config import DataConfig
from tuneloop.data.load import Row, read_examples
from tuneloop.data.split import content_hash, split_rows
from tuneloop.errors import TuneloopError


def prepare(cfg: DataConfig, run_dir: Path) -> Dataset:
    """Validate and split the examples named by `cfg`, writing them under `run_dir/data`."""
    out = run_dir / "data"
    schema = _check_schema(cfg.answer_schema)
    rows, rejects = read_examples(cfg.path)
    test_rows: list[Row] = []
    if cfg.test_path is not None:
        test_rows, test_rejects = read_examples(cfg.test_path)
        rejects += test_rejects
    read = len(rows) + len(test_rows) + len(rejects)
    _write_jsonl(out / "rejects.jsonl", [{"source": r.source, "reason": r.reason} for r in rejects])
    if read == 0:
        raise TuneloopError(f"{cfg.path}: no rows to read")
    if len(rejects) > cfg.max_reject_fraction * read:
        first = rejects[0]
        raise TuneloopError(
            f"{first.source}: {first.reason} ({len(rejects)} of {read} rows rejected, above the "
            f"{cfg.max_reject_fraction:.0%} limit; all are listed in {out / 'rejects.jsonl'})"
        )

    rows = [_with_system_prompt(r, cfg.system_prompt) for r in rows]
    test_rows = [_with_system_prompt(r, cfg.system_prompt) for r in test_rows]
    test_keys = {content_hash([r]) for r in test_rows}
    rows, duplicates, leaked = _drop_duplicates(rows, test_keys)
    test_rows, test_duplicates, _ = _drop_duplicates(test_rows, set())

    if cfg.test_path is None:
        splits = split_rows(rows, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    else:
        splits = split_rows(rows, cfg.val_fraction, 0.0, cfg.seed)
        splits["test"] = test_rows
    if not splits["train"] or not splits["test"]:
        raise TuneloopError(
            f"{cfg.path}: {len(rows)} usable rows are too few to split into train and test; add examples"
        )

    paths = {name: out / f"{name}.jsonl" for name in splits}
    for name, split in splits.items():
        _write_jsonl(paths[name], [{"messages": r.messages, "source": r.source} for r in split])
    split_hashes = {name: content_hash(split) for name, split in splits.items()}
    counts = {
        "read": read,
        "rejected": len(rejects),
        "duplicates_removed": len(duplicates) + len(test_duplicates),
        "test_leaks_removed": len(leaked),
        **{name: len(split) for name, split in splits.items()},
    }
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


def _check_schema(path: Path | None) -> dict | None:
    if path is None:
        return None
    if not path.is_file():
        raise TuneloopError(f"{path}: answer schema not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TuneloopError(f"{path}:{err.lineno}: answer schema is not valid JSON: {err.msg}") from None


def _with_system_prompt(row: Row, system_prompt: str | None) -> Row:
    if system_prompt is None or row.messages[0]["role"] == "system":
        return row
    return Row(row.source, [{"role": "system", "content": system_prompt}, *row.messages])


def _drop_duplicates(rows: list[Row], test_keys: set[str]) -> tuple[list[Row], list[Row], list[Row]]:
    """Keep the first of each exact duplicate; drop rows identical to a test row."""
    seen: set[str] = set()
    kept, duplicates, leaked = [], [], []
    for row in rows:
        key = content_hash([row])
        if key in test_keys:
            leaked.append(row)
        elif key in seen:
            duplicates.append(row)
        else:
            seen.add(key)
            kept.append(row)
    return kept, duplicates, leaked


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


__all__ = ["prepare"]
