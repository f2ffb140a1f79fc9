import json
from pathlib import Path

import pytest

from tuneloop.config import DataConfig
from tuneloop.data import prepare
from tuneloop.errors import TuneloopError


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(100)])
    a = prepare(DataConfig(path=src, system_prompt="Be brief."), tmp_path / "a")
    b = prepare(DataConfig(path=src, system_prompt="Be brief."), tmp_path / "b")
    assert a.hash == b.hash and a.split_hashes == b.split_hashes
    assert (a.counts["train"], a.counts["val"], a.counts["test"]) == (80, 10, 10)
    contents = {name: {line for line in getattr(a, name).read_text().splitlines()} for name in ("train", "val", "test")}
    assert not contents["train"] & contents["test"] and not contents["train"] & contents["val"]
    row = json.loads(next(iter(contents["test"])))
    assert row["messages"][0] == {"role": "system", "content": "Be brief."}
    assert row["source"].startswith(f"{src}:")
    other_seed = prepare(DataConfig(path=src, seed=1), tmp_path / "c")
    assert other_seed.split_hashes["test"] != a.split_hashes["test"]


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"text": "hi"}), "unknown row format"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}), "unknown or missing role"),
        (json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}), "empty user content"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "does not end with an assistant turn"),
        (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}), "content must be a string"),
    ],
)
def test_bad_rows_are_rejected_with_file_line_and_reason(tmp_path, bad_line, reason):
    src = write_jsonl(tmp_path / "d.jsonl", [chat(0), chat(1), bad_line, *[chat(i) for i in range(2, 30)]])
    dataset = prepare(DataConfig(path=src), tmp_path / "run")
    rejects = [json.loads(line) for line in (dataset.dir / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1
    assert rejects[0]["source"] == f"{src}:3"
    assert reason in rejects[0]["reason"]
    c = dataset.counts
    assert c["read"] == 31 == c["train"] + c["val"] + c["test"] + c["rejected"] + c["duplicates_removed"] + c["test_leaks_removed"]


def test_too_many_rejects_stop_with_the_first_location(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [chat(0), "{broken", chat(1), chat(2)])
    with pytest.raises(TuneloopError) as caught:
        prepare(DataConfig(path=src), tmp_path / "run")
    message = str(caught.value)
    assert message.startswith(f"{src}:2: invalid JSON")
    assert "1 of 4 rows rejected" in message
    assert (tmp_path / "run" / "data" / "rejects.jsonl").read_text().count("\n") == 1


def test_duplicates_and_test_copies_are_removed_and_counted(tmp_path):
    train_rows = [chat(i) for i in range(40)] + [chat(3), chat(4), chat(100)]
    src = write_jsonl(tmp_path / "d.jsonl", train_rows)
    test = write_jsonl(tmp_path / "t.jsonl", [chat(100), chat(101)])
    dataset = prepare(DataConfig(path=src, test_path=test), tmp_path / "run")
    c = dataset.counts
    assert (c["duplicates_removed"], c["test_leaks_removed"], c["test"]) == (2, 1, 2)
    assert c["read"] == c["train"] + c["val"] + c["test"] + c["duplicates_removed"] + c["test_leaks_removed"]
    assert "answer 100" not in dataset.train.read_text()


def test_prompt_completion_rows_become_chat(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)])
    dataset = prepare(DataConfig(path=src), tmp_path / "run")
    row = json.loads(dataset.train.read_text().splitlines()[0])
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]


def test_missing_data_file(tmp_path):
    with pytest.raises(TuneloopError, match="data file not found"):
        prepare(DataConfig(path=tmp_path / "missing.jsonl"), tmp_path / "run")
