"""Feedback rows as training examples: which rows make one, and the seeded split between training and the
production golden set."""

from __future__ import annotations

from tuneloop.data.feedback import feedback_examples, is_golden
from tuneloop.pipeline import lineage_tags
from tuneloop.pipeline.loop import DatasetVersion

PROMPT = [{"role": "user", "content": "Where is my invoice?"}]


def row(completion_id: str, rating: str = "bad", correction: str | None = "fixed", version: str = "triage-v1",
        prompt=PROMPT, answer: str = "wrong") -> dict:
    return {"id": f"fb-{completion_id}-{rating}", "completion_id": completion_id, "rating": rating,
            "correction": correction, "version": version, "prompt": prompt, "answer": answer}


def test_corrections_become_chat_rows_and_the_latest_rating_counts():
    feedback = [
        row("a", correction="first try"), row("a", correction="second try"),  # corrected twice: the last one
        row("b", rating="good", correction=None),  # good answers only with include_good
        row("c", correction=None),  # bad without a correction: nothing to learn from
        row("d", prompt=None),  # its text was dropped for personal data
        row("e", prompt="Once upon"),  # a /v1/completions request
        row("f", version="other-model-v1"),
        row("g", version="triage"),
    ]
    examples = feedback_examples(feedback, "triage", include_good=False, golden_share=0.0, seed=0)

    assert [(e["completion_id"], e["messages"][-1]["content"]) for e in examples.train] == [
        ("a", "second try"), ("g", "fixed")]
    assert examples.train[0]["messages"] == [*PROMPT, {"role": "assistant", "content": "second try"}]
    assert examples.train[0]["feedback_id"] == "fb-a-bad"
    assert examples.golden == []
    assert dict(examples.skipped) == {"superseded": 1, "good_not_included": 1, "bad_without_correction": 1,
                                      "prompt_not_kept": 1, "not_chat": 1, "other_model": 1}

    with_good = feedback_examples(feedback, "triage", include_good=True, golden_share=0.0, seed=0)
    assert ("b", "wrong") in [(e["completion_id"], e["messages"][-1]["content"]) for e in with_good.train]


def test_the_golden_split_is_seeded_by_request_id_and_never_overlaps_training():
    feedback = [row(f"chatcmpl-{i}") for i in range(400)]
    examples = feedback_examples(feedback, "triage", include_good=False, golden_share=0.2, seed=7)
    golden = {e["completion_id"] for e in examples.golden}
    train = {e["completion_id"] for e in examples.train}

    assert not golden & train and len(golden | train) == 400
    assert 0.15 < len(golden) / 400 < 0.25
    assert golden == {f"chatcmpl-{i}" for i in range(400) if is_golden(f"chatcmpl-{i}", 0.2, 7)}
    again = feedback_examples(list(reversed(feedback)), "triage", include_good=False, golden_share=0.2, seed=7)
    assert {e["completion_id"] for e in again.golden} == golden  # independent of order
    other_seed = feedback_examples(feedback, "triage", include_good=False, golden_share=0.2, seed=8)
    assert {e["completion_id"] for e in other_seed.golden} != golden


def test_lineage_names_the_feedback_rows_and_stays_within_mlflow_tag_limits():
    version = DatasetVersion(hash="h", sources={}, counts={}, split_hashes={}, parent="p",
                             feedback=[f"chatcmpl-{i:032d}" for i in range(500)])
    tags = lineage_tags(version)

    assert tags["lineage.parent"] == "p" and tags["lineage.feedback_rows"] == "500"
    assert len(tags["lineage.feedback"]) < 5100 and tags["lineage.feedback"].startswith("chatcmpl-" + "0" * 32)
    listed, more = tags["lineage.feedback"].split(",... (+")
    assert len(listed.split(",")) + int(more.split()[0]) == 500
    short = lineage_tags(DatasetVersion(hash="h", sources={}, counts={}, split_hashes={}, feedback=["a", "b"]))
    assert short["lineage.feedback"] == "a,b" and "lineage.parent" not in short
