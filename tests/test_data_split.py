"""Splits: seeded, stratified when answers are labels, leak-free, and versioned by content."""

import json
import shutil
from collections import Counter
from pathlib import Path

from tuneloop.config import DataConfig
from tuneloop.data import prepare


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def answers(path: Path) -> list[str]:
    return [json.loads(line)["messages"][-1]["content"] for line in path.read_text().splitlines()]


def test_label_answers_are_stratified(tmp_path):
    # 160 "spam" and 40 "ham": every split keeps the 4:1 ratio.
    rows = [chat(f"message number {i}", "spam" if i % 5 else "ham") for i in range(200)]
    dataset = prepare(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows)), tmp_path / "run")
    assert Counter(answers(dataset.test)) == {"spam": 16, "ham": 4}
    assert Counter(answers(dataset.val)) == {"spam": 16, "ham": 4}
    assert Counter(answers(dataset.train)) == {"spam": 128, "ham": 32}


def test_a_json_label_field_is_stratified(tmp_path):
    rows = [
        chat(f"ticket {i}", json.dumps({"category": "bug" if i % 4 else "billing", "summary": f"s{i}"}))
        for i in range(200)
    ]
    dataset = prepare(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), label_field="category"), tmp_path / "run")
    test = Counter(json.loads(a)["category"] for a in answers(dataset.test))
    assert test == {"bug": 15, "billing": 5}


def test_the_same_content_gets_the_same_hash_anywhere(tmp_path):
    rows = [chat(f"q{i}", f"a{i}") for i in range(50)]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = write_jsonl(tmp_path / "one" / "d.jsonl", rows)
    second = shutil.copy(first, tmp_path / "two" / "renamed.jsonl")
    a = prepare(DataConfig(path=first), tmp_path / "run-a")
    b = prepare(DataConfig(path=Path(second)), tmp_path / "run-b")
    assert a.hash == b.hash and a.split_hashes == b.split_hashes
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows[::-1])
    assert prepare(DataConfig(path=shuffled), tmp_path / "run-c").split_hashes == a.split_hashes
    changed = write_jsonl(tmp_path / "changed.jsonl", [*rows[:-1], chat("q49", "a different answer")])
    assert prepare(DataConfig(path=changed), tmp_path / "run-d").hash != a.hash
    meta = json.loads((a.dir / "meta.json").read_text())
    assert meta["hash"] == a.hash and meta["split_hashes"]["test"] == a.split_hashes["test"]


def test_a_user_supplied_test_file_is_never_trained_on(tmp_path):
    rows = [chat(f"question {i} " * 10, f"answer {i}") for i in range(40)]
    test_rows = [chat(f"held out {i} " * 10, f"kept {i}") for i in range(8)]
    rows += [test_rows[0], chat(test_rows[1]["messages"][0]["content"], "kept 1")]
    dataset = prepare(
        DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), test_path=write_jsonl(tmp_path / "t.jsonl", test_rows)),
        tmp_path / "run",
    )
    assert dataset.counts["test"] == 8 and dataset.counts["test_leaks_removed"] == 2
    assert not any(a.startswith("kept") for a in answers(dataset.train) + answers(dataset.val))


def test_the_report_holds_every_count(tmp_path):
    rows = [chat(f"q{i}", f"a{i}") for i in range(40)] + [chat("q1", "a1"), chat("q2", "As an AI, I cannot.")]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    src.write_text(src.read_text() + "{oops\n")
    dataset = prepare(DataConfig(path=src), tmp_path / "run")
    report = (dataset.dir / "data_report.md").read_text()
    assert "Read 43 rows: kept 40, rejected 1, removed 2." in report
    assert "| invalid_json | 1 |" in report and "| exact_duplicate | 1 |" in report and "| refusal | 1 |" in report
    assert dataset.split_hashes["train"] in report
    assert (dataset.dir / "lengths.png").stat().st_size > 1000
