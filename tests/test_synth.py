"""`tuneloop synth` against a scripted teacher on loopback, `tuneloop review`, and the reviewed version training."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from tuneloop.synth.teacher import read_reply

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ticket-triage"
PRODUCTS = ["ledgerly", "pocketpos", "huddle", "vaultbox"]
THINGS = ["invoice export", "card reader", "video call", "shared folder", "login page", "receipt printer"]
PLACES = ["Lisbon", "Leeds", "Austin", "Osaka", "Cairo", "Quito", "Perth"]


def _answer(k: int, **changes) -> dict:
    answer = {"category": "bug", "product": PRODUCTS[k % 4], "priority": ["low", "medium", "high"][k % 3],
              "needs_human": k % 2 == 0, "summary": f"Customer reports a broken {THINGS[k % 6]}."}
    return {**answer, **changes}


def _ticket(k: int) -> str:
    return (f"Hi, our {THINGS[k % 6]} in the {PLACES[k % 7]} office stopped working after ticket {k} was closed; "
            f"it shows error code E{1000 + 37 * k} every morning and the team of {k + 3} cannot work around it.")


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + 5]) for i in range(max(1, len(words) - 4))}


def _jaccard(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


def _asked(row: dict) -> str:
    return "\n".join(m["content"] for m in row["messages"] if m["role"] != "system")


def test_teacher_replies_are_read_or_rejected_with_a_reason():
    examples, problems = read_reply('```json\n{"examples": [{"input": " hi ", "output": {"a": 1}}, {"input": "x"}]}\n```')
    assert [(e.input, e.output) for e in examples] == [("hi", '{"a": 1}')]
    assert [kind for kind, _ in problems] == ["incomplete_example"]
    assert read_reply("Sure! Here are some examples")[1][0][0] == "unreadable_reply"
    assert read_reply('{"rows": []}')[1] == [("unreadable_reply", 'the reply has no "examples" list')]


def test_synth_review_and_the_reviewed_version_trains(tiny_model_dir, prepared_project, openai_stub, tmp_path):
    run = tmp_path / "runs" / "synth-cli"
    calls, repeat = [], []
    lock = threading.Lock()

    def teacher(body, index):
        if body["model"] == "scripted-judge":  # low scores for the tickets from Osaka
            return "Score: 2" if "Osaka" in body["messages"][-1]["content"] else "Fine. Score: 4"
        with lock:
            index = len(calls)
            calls.append(body)
        if index == 0:
            return "Sure! Here are five new tickets for you."  # no JSON: the request yields no row
        if repeat:  # a row already waiting for review, and a new one
            waiting = repeat[0]["messages"]
            return json.dumps({"examples": [{"input": waiting[-2]["content"], "output": json.loads(waiting[-1]["content"])},
                                            {"input": _ticket(500 + index), "output": _answer(500 + index)}]})
        test = [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]
        train = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text().splitlines()]
        copied = test[index % len(test)]["messages"]
        k = 10 * index
        rows = [
            {"input": _ticket(k), "output": _answer(k)},
            {"input": _ticket(k + 1), "output": _answer(k + 1)},
            {"input": _ticket(k + 2), "output": _answer(k + 2, priority="whenever")},  # fails the schema
            {"input": copied[-2]["content"] + " Thanks", "output": json.loads(copied[-1]["content"])},  # a test row
            {"input": train[index]["messages"][-2]["content"], "output": json.loads(train[index]["messages"][-1]["content"])},
            {"input": _ticket(k + 3), "output": _answer(k + 3)},
        ]
        return json.dumps({"examples": rows})

    url, _ = openai_stub(teacher)
    cli = prepared_project(f"""
name: synth-cli
base_model: {tiny_model_dir}
data:
  path: data.jsonl
  answer_schema: {EXAMPLE / 'schema.json'}
  system_prompt: Triage this support message as JSON.
  seed: 7
train:
  max_steps: 2
  batch_size: 2
  save_steps: 1000
synth:
  teacher: {{base_url: "{url}", model: scripted-teacher, concurrency: 2}}
  teacher_terms: outputs may train other models (scripted test teacher)
  rows_per_request: 6
  judge: true
  min_judge_score: 3
eval:
  judge: {{base_url: "{url}", model: scripted-judge}}
""")
    before = json.loads((run / "data" / "dataset_version.json").read_text())

    result = cli("synth", "config.yaml", "--n", "10")

    assert result.exit_code == 0, result.output
    queue = [json.loads(line) for line in (run / "synth" / "queue.jsonl").read_text().splitlines()]
    assert len(queue) == 10 and {r["status"] for r in queue} == {"pending"}
    assert all(r["teacher"] == "scripted-teacher" and r["messages"][0]["content"].startswith("Triage") for r in queue)
    rejects = [json.loads(line) for line in (run / "synth" / "001" / "rejects.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rejects}
    assert {"unreadable_reply", "schema", "test_leak", "exact_duplicate", "judge_score"} <= kinds, rejects
    assert all(r["judge_score"] == 4 and "Osaka" not in r["messages"][1]["content"] for r in queue)
    assert all(r["reason"] for r in rejects)
    for kind in ("unreadable_reply", "schema", "test_leak", "exact_duplicate", "judge_score"):
        assert kind in result.output
    # The teacher was shown the task's instructions, training rows and the schema, and asked for JSON.
    asked = calls[1]["messages"][1]["content"]
    assert "Triage this support message" in asked and '"enum"' in asked and calls[1]["response_format"]["type"] == "json_schema"
    # Checked independently of the data stage: nothing queued is a near copy of a test row.
    test_rows = [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]
    assert max(_jaccard(_asked(q), _asked(t)) for q in queue for t in test_rows) < 0.85

    # A second run is checked against the rows still waiting too.
    repeat.append(queue[0])
    again = cli("synth", "config.yaml", "--n", "1")
    assert again.exit_code == 0, again.output
    assert len((run / "synth" / "queue.jsonl").read_text().splitlines()) == 11
    second = [json.loads(line) for line in (run / "synth" / "002" / "rejects.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in second] == ["exact_duplicate"]

    # Review from a file: a bad decision records nothing.
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "nope", "action": "accept"}) + "\n")
    refused = cli("review", "config.yaml", "--decisions", "bad.jsonl", "--reviewer", "alice")
    assert refused.exit_code == 1 and "no synthetic row 'nope'" in refused.output
    invalid = {"id": queue[0]["id"], "action": "edit", "answer": {"category": "nonsense"}}
    (tmp_path / "bad.jsonl").write_text(json.dumps(invalid) + "\n")
    refused = cli("review", "config.yaml", "--decisions", "bad.jsonl", "--reviewer", "alice")
    assert refused.exit_code == 1 and "fails the schema" in refused.output
    assert all(json.loads(line)["status"] == "pending" for line in (run / "synth" / "queue.jsonl").read_text().splitlines())

    edited = _answer(99, category="billing")
    decisions = [{"id": queue[0]["id"], "action": "edit", "answer": edited},
                 {"id": queue[1]["id"], "action": "reject", "reason": "too close to the examples"}]
    decisions += [{"id": r["id"], "action": "accept"} for r in queue[2:6]]
    (tmp_path / "decisions.jsonl").write_text("".join(json.dumps(d) + "\n" for d in decisions))
    reviewed = cli("review", "config.yaml", "--decisions", "decisions.jsonl", "--reviewer", "alice")
    assert reviewed.exit_code == 0, reviewed.output
    first = json.loads((run / "data" / "dataset_version.json").read_text())
    assert first["parent"] == before["hash"] and first["synthetic"]["rows"] == 5
    # The rest in the terminal: accept, edit (a wrong answer is asked again), reject, then quit.
    good = json.dumps(_answer(98))
    typed = cli("review", "config.yaml", "--reviewer", "bob", input=f"a\ne\nnot json\n{good}\nr\nq\n")
    assert typed.exit_code == 0, typed.output
    assert "answer is not valid JSON" in typed.output

    statuses = [json.loads(line)["status"] for line in (run / "synth" / "queue.jsonl").read_text().splitlines()]
    assert statuses == ["edited", "rejected", *["accepted"] * 4, "accepted", "edited", "rejected", "pending", "pending"]
    version = json.loads((run / "data" / "dataset_version.json").read_text())
    assert version["parent"] == first["hash"] != version["hash"]
    assert version["synthetic"]["rows"] == 7 and version["synthetic"]["edited"] == 2
    assert version["synthetic"]["teachers"] == ["scripted-teacher"] and version["synthetic"]["reviewed_by"] == ["alice", "bob"]
    assert version["synthetic"]["terms"] == ["outputs may train other models (scripted test teacher)"]
    # Synthetic rows train only: the real rows split as before, and no synthetic row is in val or test.
    assert version["split_hashes"]["test"] == before["split_hashes"]["test"]
    assert version["split_hashes"]["val"] == before["split_hashes"]["val"]
    assert version["counts"]["train"] == before["counts"]["train"] + 7
    train = (run / "data" / "train.jsonl").read_text()
    assert json.dumps(edited)[:40].replace('"', '\\"') in train

    trained = cli("train", "config.yaml")
    assert trained.exit_code == 0, trained.output
    meta = json.loads((run / "train" / "meta.json").read_text())
    assert meta["dataset_hash"] == version["hash"]


def test_lineage_tags_name_the_teacher_and_the_reviewers():
    from tuneloop.pipeline import DatasetVersion, lineage_tags

    version = DatasetVersion("h", {}, {}, {}, synthetic={"rows": 7, "teachers": ["t"], "terms": ["may train"],
                                                         "reviewed_by": ["alice", "bob"], "edited": 1, "file": "f"})
    tags = lineage_tags(version)
    assert tags["lineage.synthetic_rows"] == "7" and tags["lineage.synthetic_teachers"] == "t"
    assert tags["lineage.synthetic_terms"] == "may train" and tags["lineage.reviewed_by"] == "alice,bob"
