"""Every input format ends up in the one internal chat form."""

import json
from pathlib import Path

import pytest

from tuneloop.config import DataConfig
from tuneloop.data import prepare


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def all_rows(dataset) -> list[dict]:
    return [json.loads(line) for p in (dataset.train, dataset.val, dataset.test) for line in p.read_text().splitlines()]


def by_source_line(dataset, line: int) -> dict:
    return next(r for r in all_rows(dataset) if r["source"].endswith(f":{line}"))


def test_alpaca_with_and_without_input(tmp_path):
    records = [{"instruction": f"Translate {i}", "input": "bonjour" if i % 2 else "", "output": f"hello {i}"} for i in range(20)]
    dataset = prepare(DataConfig(path=write_jsonl(tmp_path / "a.jsonl", records)), tmp_path / "run")
    assert by_source_line(dataset, 2)["messages"] == [
        {"role": "user", "content": "Translate 1\n\nbonjour"},
        {"role": "assistant", "content": "hello 1"},
    ]
    assert by_source_line(dataset, 1)["messages"][0] == {"role": "user", "content": "Translate 0"}


def test_sharegpt_multi_turn_with_system(tmp_path):
    records = [
        {"conversations": [
            {"from": "system", "value": "Be terse."},
            {"from": "human", "value": f"hi {i}"},
            {"from": "gpt", "value": f"hello {i}"},
            {"from": "human", "value": "and?"},
            {"from": "gpt", "value": f"bye {i}"},
        ]}
        for i in range(20)
    ]
    records[3]["conversations"][1]["from"] = "narrator"
    dataset = prepare(DataConfig(path=write_jsonl(tmp_path / "s.jsonl", records), max_reject_fraction=0.1), tmp_path / "run")
    row = by_source_line(dataset, 1)
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert row["messages"][-1]["content"] == "bye 0"
    assert dataset.counts["rejected_by_reason"] == {"unknown_role": 1}


def test_preference_pairs_keep_the_rejected_answer(tmp_path):
    records = [{"prompt": f"Name a colour {i}", "chosen": f"blue {i}", "rejected": f"a dog {i}"} for i in range(10)]
    records += [
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Say hi {i}"}],
            "chosen": [{"role": "assistant", "content": f"Hi there {i}!"}],
            "rejected": [{"role": "user", "content": f"Say hi {i}"}, {"role": "assistant", "content": f"No {i}."}],
        }
        for i in range(10)
    ]
    dataset = prepare(DataConfig(path=write_jsonl(tmp_path / "p.jsonl", records)), tmp_path / "run")
    assert by_source_line(dataset, 1) == {
        "messages": [{"role": "user", "content": "Name a colour 0"}, {"role": "assistant", "content": "blue 0"}],
        "rejected": "a dog 0",
        "source": f"{tmp_path / 'p.jsonl'}:1",
    }
    row = by_source_line(dataset, 11)
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert (row["messages"][-1]["content"], row["rejected"]) == ("Hi there 0!", "No 0.")


def test_prompt_completion_and_an_explicit_format(tmp_path):
    records = [{"prompt": f"p{i}", "completion": f"c{i}", "chosen": "x", "rejected": "y"} for i in range(20)]
    src = write_jsonl(tmp_path / "pc.jsonl", records)
    detected = prepare(DataConfig(path=src), tmp_path / "auto")
    assert "rejected" in by_source_line(detected, 1)  # the keys also fit a preference pair
    forced = prepare(DataConfig(path=src, format="prompt_completion"), tmp_path / "forced")
    assert by_source_line(forced, 1) == {
        "messages": [{"role": "user", "content": "p0"}, {"role": "assistant", "content": "c0"}],
        "source": f"{src}:1",
    }


def test_a_row_of_another_format_in_a_file_is_rejected(tmp_path):
    records = [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(30)]
    records[7] = {"prompt": "p", "completion": "c"}
    dataset = prepare(DataConfig(path=write_jsonl(tmp_path / "a.jsonl", records)), tmp_path / "run")
    reject = json.loads((dataset.dir / "rejects.jsonl").read_text())
    assert reject["line"] == 8 and "expected `instruction`/`output` like the rest of this alpaca file" in reject["reason"]


def test_csv_with_a_column_mapping(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text('question,reply,notes\n"What is 2+2,\nreally?",4,x\n' + "".join(f"q{i},a{i},\n" for i in range(20)))
    dataset = prepare(DataConfig(path=src, columns={"prompt": "question", "completion": "reply"}), tmp_path / "run")
    assert by_source_line(dataset, 2)["messages"] == [
        {"role": "user", "content": "What is 2+2,\nreally?"},
        {"role": "assistant", "content": "4"},
    ]
    assert by_source_line(dataset, 4)["messages"][0]["content"] == "q0"  # line numbers count the quoted newline


def test_plain_text_paragraphs_for_continued_pretraining(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("".join(f"Paragraph {i} first line.\nParagraph {i} second line.\n\n" for i in range(20)))
    dataset = prepare(DataConfig(path=src), tmp_path / "run")
    assert by_source_line(dataset, 4)["messages"] == [
        {"role": "assistant", "content": "Paragraph 1 first line.\nParagraph 1 second line."}
    ]
    assert dataset.counts["read"] == 20


def test_a_directory_of_files_in_different_formats(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(10)])
    write_jsonl(data / "b.jsonl", [{"conversations": [{"from": "human", "value": f"h{i}"}, {"from": "gpt", "value": f"g{i}"}]} for i in range(10)])
    (data / "notes.md").write_text("ignored")
    dataset = prepare(DataConfig(path=data), tmp_path / "run")
    assert dataset.counts["read"] == 20
    assert {Path(r["source"].rsplit(":", 1)[0]).name for r in all_rows(dataset)} == {"a.jsonl", "b.jsonl"}


@pytest.mark.parametrize("fmt", ["chat", "alpaca", "sharegpt", "preference", "prompt_completion", "csv", "text"])
def test_every_format_writes_the_internal_form(tmp_path, fmt):
    make = {
        "chat": lambda i: {"messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]},
        "alpaca": lambda i: {"instruction": f"u{i}", "output": f"a{i}"},
        "sharegpt": lambda i: {"conversations": [{"from": "human", "value": f"u{i}"}, {"from": "gpt", "value": f"a{i}"}]},
        "preference": lambda i: {"prompt": f"u{i}", "chosen": f"a{i}", "rejected": "no"},
        "prompt_completion": lambda i: {"prompt": f"u{i}", "completion": f"a{i}"},
    }
    if fmt == "csv":
        src = tmp_path / "d.csv"
        src.write_text("prompt,completion\n" + "".join(f"u{i},a{i}\n" for i in range(20)))
    elif fmt == "text":
        src = tmp_path / "d.txt"
        src.write_text("".join(f"a{i}\n\n" for i in range(20)))
    else:
        src = write_jsonl(tmp_path / "d.jsonl", [make[fmt](i) for i in range(20)])
    dataset = prepare(DataConfig(path=src), tmp_path / "run")
    for row in all_rows(dataset):
        assert set(row) <= {"messages", "source", "rejected"} and row["messages"][-1]["role"] == "assistant"
        assert row["messages"][-1]["content"].startswith("a")
    assert dataset.counts["train"] + dataset.counts["val"] + dataset.counts["test"] == 20


def test_a_csv_file_with_an_explicit_row_format(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("instruction,input,output\n" + "".join(f"do {i},with {i},done {i}\n" for i in range(20)))
    dataset = prepare(DataConfig(path=src, format="alpaca"), tmp_path / "run")
    assert by_source_line(dataset, 2)["messages"][0] == {"role": "user", "content": "do 0\n\nwith 0"}


def test_openai_dpo_rows_become_preference_pairs(tmp_path):
    records = [
        {
            "input": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{i}?"}],
                      "tools": [], "parallel_tool_calls": True},
            "preferred_output": [{"role": "assistant", "content": f"A{i}."}],
            "non_preferred_output": [{"role": "assistant", "content": f"A long answer {i}."}],
        }
        for i in range(19)
    ]
    records.append({"input": {"prompt": "no messages"}, "preferred_output": "a", "non_preferred_output": "b"})
    dataset = prepare(DataConfig(path=write_jsonl(tmp_path / "dpo.jsonl", records)), tmp_path / "run")
    row = by_source_line(dataset, 3)
    assert row["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q2?"},
                               {"role": "assistant", "content": "A2."}]
    assert row["rejected"] == "A long answer 2."
    reject = json.loads((tmp_path / "run" / "data" / "rejects.jsonl").read_text())
    assert reject["line"] == 20 and reject["reason"] == "`input` must be an object with `messages`"


def test_a_validation_file_is_the_validation_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(30)])
    val = write_jsonl(tmp_path / "val.jsonl", [
        {"prompt": f"held question {i}", "completion": f"held answer {i}"} for i in range(5)] + [{"prompt": "x"}])
    dataset = prepare(DataConfig(path=train, val_path=val, test_fraction=0.2, seed=3), tmp_path / "run")
    val_rows = [json.loads(line) for line in dataset.val.read_text().splitlines()]
    assert sorted(r["messages"][0]["content"] for r in val_rows) == [f"held question {i}" for i in range(5)]
    assert dataset.counts["train"] + dataset.counts["test"] == 30 and dataset.counts["test"] == 6
    assert dataset.counts["read"] == 36 and dataset.counts["rejected"] == 1  # the validation file's bad row
    reject = json.loads((tmp_path / "run" / "data" / "rejects.jsonl").read_text())
    assert reject["file"] == str(val) and reject["line"] == 6
