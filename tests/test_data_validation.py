"""One test per malformed-input kind: the row is in rejects.jsonl with file, line and reason, the
stop message names the same, and the counts reconcile."""

import json

import pytest

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import DataConfig
from tuneloop.data import prepare
from tuneloop.errors import TuneloopError


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def good_lines(n: int, start: int = 0) -> bytes:
    return b"".join(json.dumps(chat(i)).encode() + b"\n" for i in range(start, start + n))


def user_then(answer: str) -> dict:
    return {"messages": [{"role": "user", "content": "classify this"}, {"role": "assistant", "content": answer}]}


def reconciles(counts: dict) -> bool:
    kept = counts["train"] + counts["val"] + counts["test"]
    return (
        counts["read"] == kept + counts["rejected"] + counts["removed"]
        and counts["rejected"] == sum(counts["rejected_by_reason"].values())
        and counts["removed"] == sum(counts["removed_by_reason"].values())
    )


BAD_LINES = {
    "invalid_json": (b'{"messages": [', "invalid JSON"),
    "invalid_utf8": (b'{"messages": "caf\xe9"}', "invalid UTF-8"),
    "bom": (b"\xef\xbb\xbf" + json.dumps(chat(900)).encode(), "byte-order mark"),
    "crlf": (json.dumps(chat(901)).encode() + b"\r", "CRLF line ending"),
    "missing_role": (json.dumps({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}).encode(), "unknown or missing role None"),
    "unknown_role": (json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}).encode(), "unknown or missing role 'robot'"),
    "empty_content": (json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}).encode(), "empty user content"),
    "wrong_type_content": (json.dumps({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}).encode(), "user content must be a string"),
    "wrong_type_row": (b"[1, 2]", "expected a JSON object, got list"),
    "wrong_type_messages": (json.dumps({"messages": "hello"}).encode(), "`messages` must be a non-empty list"),
    "not_ending_with_assistant": (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "does not end with an assistant turn"),
    "unknown_format": (json.dumps({"question": "x", "answer": "y"}).encode(), "unknown row format"),
}


@pytest.mark.parametrize("kind", BAD_LINES)
def test_each_malformed_row_is_rejected_with_file_line_and_reason(tmp_path, kind):
    bad, reason = BAD_LINES[kind]
    src = tmp_path / "d.jsonl"
    src.write_bytes(good_lines(3) + bad + b"\n" + good_lines(26, start=3))
    dataset = prepare(DataConfig(path=src), tmp_path / "run")
    rejects = [json.loads(line) for line in (dataset.dir / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1
    assert (rejects[0]["file"], rejects[0]["line"], rejects[0]["source"]) == (str(src), 4, f"{src}:4")
    assert reason in rejects[0]["reason"]
    assert dataset.counts["read"] == 30 and dataset.counts["rejected"] == 1 and reconciles(dataset.counts)

    # Above the limit, the run stops and the message starts with that row's file:line: reason.
    with pytest.raises(TuneloopError) as caught:
        prepare(DataConfig(path=src, max_reject_fraction=0.0), tmp_path / "strict")
    assert str(caught.value).startswith(f"{src}:4: ") and reason in str(caught.value)
    assert "1 of 30 rows rejected" in str(caught.value)


def test_bom_and_crlf_are_repaired_when_asked(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + good_lines(30).replace(b"\n", b"\r\n"))
    counts = prepare(DataConfig(path=src, fix_line_ends=True), tmp_path / "run").counts
    assert counts["rejected"] == 0 and counts["train"] + counts["val"] + counts["test"] == 30


def test_answers_that_fail_the_schema_are_rejected(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({
        "type": "object",
        "properties": {"label": {"enum": ["spam", "ham"]}},
        "required": ["label"],
    }))
    rows = [user_then(json.dumps({"label": "spam" if i % 2 else "ham", "n": i})) for i in range(40)]
    rows[4] = user_then("spam")
    rows[9] = user_then(json.dumps({"label": "alice@example.com"}))
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = prepare(DataConfig(path=src, answer_schema=schema), tmp_path / "run")
    rejects = [json.loads(line) for line in (dataset.dir / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["kind"]) for r in rejects] == [(5, "schema"), (10, "schema")]
    assert "answer is not valid JSON" in rejects[0]["reason"]
    assert "answer fails the schema at label: `enum`" in rejects[1]["reason"]
    assert "alice@example.com" not in (dataset.dir / "rejects.jsonl").read_text()  # values are never quoted
    assert reconciles(dataset.counts)


def test_rows_longer_than_the_context_are_rejected(tmp_path, tiny_model_dir):
    rows = [chat(i) for i in range(30)]
    rows[6] = user_then("word " * 300)
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = prepare(DataConfig(path=src, max_tokens=200), tmp_path / "run", base=BaseModelRef("tiny", tiny_model_dir))
    rejects = [json.loads(line) for line in (dataset.dir / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["kind"]) for r in rejects] == [(7, "too_many_tokens")]
    assert "longer than the 200-token context" in rejects[0]["reason"]
    assert "In tokens" in (dataset.dir / "data_report.md").read_text()
    assert reconciles(dataset.counts)


def test_the_context_defaults_to_the_base_models(tmp_path, tiny_model_dir):
    rows = [chat(i) for i in range(30)]
    rows[2] = user_then("word " * 2100)  # the tiny model has max_position_embeddings 2048
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = prepare(DataConfig(path=src), tmp_path / "run", base=BaseModelRef("tiny", tiny_model_dir)).counts
    assert counts["rejected_by_reason"] == {"too_many_tokens": 1}


def test_every_reject_is_listed_in_input_order(tmp_path):
    src = tmp_path / "d.jsonl"
    test = tmp_path / "t.jsonl"
    src.write_bytes(good_lines(2) + b"{bad\n" + good_lines(30, start=2) + b"[]\n")
    test.write_bytes(b"{bad\n" + good_lines(5, start=100))
    dataset = prepare(DataConfig(path=src, test_path=test, max_reject_fraction=0.2), tmp_path / "run")
    rejects = [json.loads(line) for line in (dataset.dir / "rejects.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rejects] == [f"{src}:3", f"{src}:34", f"{test}:1"]
    assert dataset.counts["rejected_by_reason"] == {"invalid_json": 2, "wrong_type": 1}
    assert reconciles(dataset.counts)


def test_no_rows_at_all(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("\n\n")
    with pytest.raises(TuneloopError, match="no rows to read"):
        prepare(DataConfig(path=src), tmp_path / "run")


def test_csv_rows_are_validated_too(tmp_path):
    src = tmp_path / "d.csv"
    lines = ["question,answer"] + [f"q{i},a{i}" for i in range(30)]
    lines[5] = "q4,"
    src.write_text("\n".join(lines) + "\n")
    dataset = prepare(DataConfig(path=src, columns={"prompt": "question", "completion": "answer"}), tmp_path / "run")
    rejects = [json.loads(line) for line in (dataset.dir / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(6, "empty assistant content")]


def test_unknown_csv_column(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("q,a\nx,y\n")
    with pytest.raises(TuneloopError, match="CSV has no column 'question'"):
        prepare(DataConfig(path=src, columns={"prompt": "question"}), tmp_path / "run")


def test_missing_path_in_a_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TuneloopError, match="no .* files in this directory"):
        prepare(DataConfig(path=tmp_path / "empty"), tmp_path / "run")
