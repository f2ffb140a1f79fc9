"""Planted exact duplicates, near duplicates, personal data and test copies are all caught; a clean
control set of the same size loses nothing."""

import json
import random
from pathlib import Path

import pytest

from tuneloop.config import DataConfig
from tuneloop.data import prepare

CASES = json.loads((Path(__file__).parent / "fixtures" / "data" / "pii_cases.json").read_text())
EXTRA = {"employee_id": r"\bEMP-\d{6}\b"}
RNG = random.Random(0)
VOCAB = sorted({"".join(RNG.choices([c + v for c in "bdfgklmnprstvz" for v in "aeiou"], k=3)) for _ in range(3000)})


def text(rng: random.Random, words: int = 200) -> str:
    return " ".join(rng.choices(VOCAB, k=words))


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def change_words(row: dict, n: int, rng: random.Random) -> dict:
    """A few words of the question replaced: with 200-word rows, Jaccard on word 5-grams stays above 0.85."""
    words = row["messages"][0]["content"].split()
    for position in rng.sample(range(len(words)), n):
        words[position] = "changed"
    return chat(" ".join(words), row["messages"][1]["content"])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(tmp_path: Path, planted: bool) -> tuple[Path, Path]:
    """66 distinct rows + 3 exact duplicates + 3 near duplicates + 3 copies of test rows, with the
    22 PII sentences (or the 22 control look-alikes) placed in 22 of the distinct rows."""
    rng = random.Random(1)
    base = [chat(text(rng), text(rng, 30)) for _ in range(66)]
    sentences = [c["sentence"] for c in CASES["planted"]] if planted else CASES["control"]
    assert len(sentences) == len(base[::3])
    for row, sentence in zip(base[::3], sentences):
        row["messages"][0]["content"] += " " + sentence
    test = [chat(text(rng), text(rng, 30)) for _ in range(10)]
    if planted:
        shouted = chat(base[5]["messages"][0]["content"].upper(), base[5]["messages"][1]["content"])
        extra = [base[1], base[4], shouted]  # exact, and exact after case/whitespace normalisation
        extra += [change_words(base[i], n, rng) for i, n in ((2, 2), (7, 3), (10, 2))]
        extra += [test[0], test[1], change_words(test[2], 2, rng)]
    else:
        extra = [chat(text(rng), text(rng, 30)) for _ in range(9)]
    rows = base + extra
    random.Random(2).shuffle(rows)
    return write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "test.jsonl", test)


def outputs(dataset) -> str:
    return "".join(p.read_text() for p in sorted(dataset.dir.iterdir()) if p.suffix in {".jsonl", ".md", ".json"})


def test_every_planted_item_is_caught(tmp_path):
    src, test = build(tmp_path, planted=True)
    cfg = DataConfig(path=src, test_path=test, pii_patterns=EXTRA)
    dataset = prepare(cfg, tmp_path / "run")
    c = dataset.counts
    assert c["removed_by_reason"] == {"exact_duplicate": 3, "near_duplicate": 3, "test_leak": 3}
    assert (c["duplicates_removed"], c["exact_duplicates_removed"], c["near_duplicates_removed"], c["test_leaks_removed"]) == (6, 3, 3, 3)
    expected = {}
    for case in CASES["planted"]:
        expected[case["kind"]] = expected.get(case["kind"], 0) + 1
    assert c["pii_found_by_kind"] == expected == c["pii_redacted_by_kind"]
    assert c["read"] == 75 + 10 == c["train"] + c["val"] + c["test"] + c["rejected"] + c["removed"]

    written = outputs(dataset)
    for case in CASES["planted"]:
        assert case["value"] not in written  # not in the splits, rejects, removed rows or the report
    for kind in expected:
        assert f"[{kind.upper()}]" in written
    test_text = dataset.test.read_text()
    train_text = dataset.train.read_text() + dataset.val.read_text()
    assert all(json.loads(line)["source"].startswith(str(test)) for line in test_text.splitlines())
    assert not {line.split('"source"')[0] for line in test_text.splitlines()} & {
        line.split('"source"')[0] for line in train_text.splitlines()
    }
    removed = [json.loads(line) for line in (dataset.dir / "removed.jsonl").read_text().splitlines()]
    assert all(r["like"] for r in removed)  # each duplicate names the row it copies


def test_a_clean_control_set_of_the_same_size_loses_nothing(tmp_path):
    src, test = build(tmp_path, planted=False)
    dataset = prepare(DataConfig(path=src, test_path=test, pii_patterns=EXTRA), tmp_path / "run")
    c = dataset.counts
    assert (c["removed"], c["rejected"], c["pii_found_by_kind"]) == (0, 0, {})
    assert c["train"] + c["val"] + c["test"] == c["read"] == 85
    for sentence in CASES["control"]:
        assert json.dumps(sentence)[1:-1] in outputs(dataset)


def test_pii_can_drop_the_row_or_be_kept(tmp_path):
    src, test = build(tmp_path, planted=True)
    dropped = prepare(DataConfig(path=src, test_path=test, pii_action="drop", pii_patterns=EXTRA), tmp_path / "drop")
    assert dropped.counts["removed_by_reason"]["pii"] == 22 and dropped.counts["pii_redacted_by_kind"] == {}
    kept = prepare(DataConfig(path=src, test_path=test, pii_action="keep"), tmp_path / "keep")
    assert "jane.doe+billing@mail.example.co.uk" in kept.train.read_text() + kept.val.read_text()
    assert "employee_id" not in kept.counts["pii_found_by_kind"]  # not configured here


def test_near_duplicate_threshold_is_configurable(tmp_path):
    rng = random.Random(3)
    rows = [chat(text(rng), text(rng, 30)) for _ in range(30)]
    rows.append(change_words(rows[0], 12, rng))  # far below 0.85, above 0.5
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    assert prepare(DataConfig(path=src), tmp_path / "a").counts["near_duplicates_removed"] == 0
    assert prepare(DataConfig(path=src, near_duplicate_threshold=0.5), tmp_path / "b").counts["near_duplicates_removed"] == 1
    assert prepare(DataConfig(path=src, near_duplicate_threshold=None), tmp_path / "c").counts["removed"] == 0


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("I'm sorry, but I can't help with that request.", "refusal"),
        ("As an AI language model, I do not have opinions.", "refusal"),
        ("ok\nok\nok\nok", "repeated_lines"),
        ("x" * 200, "too_long"),
    ],
)
def test_quality_filters(tmp_path, answer, reason):
    rows = [chat(f"question {i}", f"answer {i}") for i in range(30)] + [chat("question x", answer)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    dataset = prepare(DataConfig(path=src, max_row_chars=150), tmp_path / "run")
    assert dataset.counts["removed_by_reason"] == {reason: 1}
    removed = json.loads((dataset.dir / "removed.jsonl").read_text())
    assert (removed["line"], removed["reason"]) == (31, reason)


def test_too_short_answers(tmp_path):
    rows = [chat(f"question {i}", f"answer {i}") for i in range(30)] + [chat("question x", "no")]
    dataset = prepare(DataConfig(path=write_jsonl(tmp_path / "d.jsonl", rows), min_answer_chars=3), tmp_path / "run")
    assert dataset.counts["removed_by_reason"] == {"too_short": 1}


def test_perplexity_outliers_are_removed(tmp_path, tiny_model_dir):
    from tuneloop.artifacts import BaseModelRef

    rng = random.Random(4)
    rows = [chat(text(rng, 12), text(rng, 6)) for _ in range(40)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    base = BaseModelRef("tiny", tiny_model_dir)
    dataset = prepare(DataConfig(path=src, perplexity_percentile=90), tmp_path / "run", base=base)
    c = dataset.counts
    assert c["removed_by_reason"] == {"perplexity": 4}  # the top tenth of the 40 rows
    assert c["read"] == c["train"] + c["val"] + c["test"] + c["removed"]


def test_the_perplexity_filter_needs_the_base_model(tmp_path):
    from tuneloop.errors import TuneloopError

    with pytest.raises(TuneloopError, match="needs the base model"):
        prepare(DataConfig(path=tmp_path / "d.jsonl", perplexity_percentile=95), tmp_path / "run")


def test_rows_of_a_word_or_two_are_not_near_duplicates(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(30)])
    assert prepare(DataConfig(path=src), tmp_path / "run").counts["removed"] == 0
