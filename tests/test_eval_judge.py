"""LLM-as-judge: reading judgments (pure functions), pairwise aggregation, and judging through a scripted
OpenAI-compatible server on loopback, into the metrics, intervals, gate and reports."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from tuneloop.artifacts import Dataset
from tuneloop.config import EvalConfig, MetricConfig
from tuneloop.evaluate.endpoint import Endpoint
from tuneloop.evaluate.generate import Generation
from tuneloop.evaluate.harness import compare
from tuneloop.evaluate.judge import (
    Judge,
    normalised,
    pairwise_outcome,
    parse_score,
    parse_verdict,
    score_answers,
    win_rate,
)


@pytest.mark.parametrize(
    "reply, score",
    [
        ("4", 4),
        ("The answer is close to the reference.\nScore: 4", 4),
        ("**Score:** 5", 5),
        ("Rating: 2/5", 2),
        ("score is 3", 3),
        ('{"score": 1, "reason": "wrong"}', 1),
        ("First I thought Score: 2, but on reflection\nScore: 3", 3),  # the final score counts
        ("Score: 7", None),
        ("Score: 10", None),
        ("Score: 4.5", None),
        ('{"score": 6}', None),
        ('{"score": true}', None),
        ("A solid answer overall.", None),
        ("", None),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("Answer A follows the format. [[A]]", "A"),
        ("[[B]]", "B"),
        ("Both are equally wrong. [[C]]", "tie"),
        ("Not [[A]] after all; [[ B ]]", "B"),
        ("A is better.", None),
        ("[A]", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    "first, second, outcome",
    [
        ("A", "B", 1.0),  # the candidate wins in both orders
        ("B", "A", 0.0),  # the candidate loses in both orders
        ("A", "A", 0.5),  # position bias: inconsistent, a tie
        ("B", "B", 0.5),
        ("A", "tie", 0.5),
        ("tie", "tie", 0.5),
        (None, "B", None),
        ("A", None, None),
    ],
)
def test_pairwise_outcome_needs_agreement_in_both_orders(first, second, outcome):
    assert pairwise_outcome(first, second) == outcome


def test_win_rate_counts_ties_half_and_reports_unparsed_rows():
    assert win_rate([1.0, 1.0, 0.5, 0.0, None]) == {
        "wins": 2, "ties": 1, "losses": 1, "unparsed": 1, "win_rate": 2.5 / 4,
    }
    assert win_rate([0.5, 0.5]) == {"wins": 0, "ties": 2, "losses": 0, "unparsed": 0, "win_rate": 0.5}
    assert normalised(1) == 0.0 and normalised(5) == 1.0 and normalised(None) is None


def _answer_to_score(body: dict) -> str:
    return re.search(r"## Answer to score\n(.*?)\n\n## Rubric", body["messages"][-1]["content"], re.S)[1]


def _pair(body: dict) -> tuple[str, str]:
    text = body["messages"][-1]["content"]
    return re.search(r"## Answer A\n(.*?)\n\n## Answer B\n(.*?)\n\n", text, re.S).groups()


def test_unparseable_judgments_are_asked_again_then_counted(openai_stub):
    asked: dict[str, int] = {}
    lock = threading.Lock()

    def respond(body, index):
        answer = _answer_to_score(body)
        with lock:
            asked[answer] = asked.get(answer, 0) + 1
        if answer == "good":
            return "Matches the reference.\nScore: 5"
        if answer == "meh":  # unreadable first, readable when asked again
            return "Hard to say." if asked[answer] == 1 else "Score: 3"
        return "I cannot grade this."  # never readable

    url, seen = openai_stub(respond)
    judge = Judge(Endpoint(url, "judge-model", concurrency=2), rubric="1 bad ... 5 perfect", parse_retries=2)
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]

    scores = score_answers(judge, prompts, ["ref"] * 3, ["good", "meh", "junk"])

    assert scores == [5, 3, None]
    assert asked == {"good": 1, "meh": 2, "junk": 3}  # junk: the first try and two retries
    user = seen[0]["body"]["messages"][-1]["content"]
    assert "1 bad ... 5 perfect" in user and "## Reference answer\nref" in user


@pytest.fixture
def rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
            for i in range(16)]


def dataset(tmp_path: Path) -> Dataset:
    test = tmp_path / "test.jsonl"
    return Dataset(dir=tmp_path, train=test, val=test, test=test, hash="h", split_hashes={"test": "h"}, counts={})


def fair_judge(body: dict, index: int) -> str:
    """Prefers answers that say "good", whatever their position; cannot read answers that say "???"."""
    if "???" in body["messages"][-1]["content"]:
        return "no idea"
    if "## Answer A" in body["messages"][-1]["content"]:
        a, b = _pair(body)
        return "[[A]]" if "good" in a and "good" not in b else "[[B]]" if "good" in b and "good" not in a else "[[C]]"
    answer = _answer_to_score(body)
    return "no idea" if "???" in answer else "Score: 5" if "good" in answer else "Score: 1"


def judged_config(url: str, gate: str) -> tuple[EvalConfig, Judge]:
    cfg = EvalConfig(bootstrap_resamples=200, judge={"base_url": url, "model": "judge", "parse_retries": 1}, metrics=[
        MetricConfig(name="judge", gate=gate == "judge"),
        MetricConfig(name="pairwise", gate=gate == "pairwise"),
        MetricConfig(name="exact_match"),
    ])
    return cfg, Judge.from_config(cfg.judge, None)


def test_judge_and_pairwise_are_metrics_with_intervals_and_gate(openai_stub, rows, tmp_path):
    url, _ = openai_stub(fair_judge)
    cfg, judge = judged_config(url, gate="pairwise")
    baseline = [Generation(f"bad {i}", 5.0, 3, 2) for i in range(16)]
    candidate = [Generation("??? unreadable" if i == 0 else f"good {i}", 5.0, 3, 2) for i in range(16)]

    report = compare(cfg, dataset(tmp_path), rows, baseline, candidate, tmp_path, judge=judge)

    assert report.candidate["judge"] == 1.0 and report.baseline["judge"] == 0.0  # 5 -> 1.0, 1 -> 0.0
    assert report.candidate["judge.unparsed"] == pytest.approx(1 / 16)  # counted, and left out of the mean
    assert report.candidate["pairwise"] == 1.0 and report.baseline["pairwise"] == 0.0  # wins in both orders
    assert report.candidate["pairwise.unparsed"] == report.baseline["pairwise.unparsed"] == pytest.approx(1 / 16)
    assert report.difference["judge"][1] > 0 and report.difference["pairwise"][1] > 0
    assert report.gate_metrics == ["pairwise"] and report.gate_passed is True
    scored = json.loads((tmp_path / "eval" / "candidate" / "scored.json").read_text())
    assert scored["rows"][0]["grades"]["judge.unparsed"] == 1.0 and "judge" not in scored["rows"][0]["grades"]
    markdown = (tmp_path / "eval_report.md").read_text()
    assert "candidate: 1 of 16 rows with an unparsed judgment (LLM judge: unparsed judgments)" in markdown
    assert "candidate: 1 of 16 rows with an unparsed judgment (pairwise: unparsed judgments)" in markdown
    assert "pairwise win rate" in markdown and "LLM judge" in markdown


def test_a_judge_with_position_bias_gives_ties_and_the_gate_fails(openai_stub, rows, tmp_path):
    url, seen = openai_stub(lambda body, index: "[[A]]" if "## Answer A" in body["messages"][-1]["content"] else "Score: 3")
    cfg, judge = judged_config(url, gate="pairwise")
    baseline = [Generation(f"bad {i}", 5.0, 3, 2) for i in range(16)]
    candidate = [Generation(f"good {i}", 5.0, 3, 2) for i in range(16)]

    report = compare(cfg, dataset(tmp_path), rows, baseline, candidate, tmp_path, judge=judge)

    assert report.candidate["pairwise"] == 0.5  # "A" in both orders: inconsistent on every row, all ties
    assert report.gate_passed is False and report.gate_failures[0].startswith("pairwise: +0.0 pts vs the baseline")
    pairs = [_pair(s["body"]) for s in seen if "## Answer A" in s["body"]["messages"][-1]["content"]]
    assert len(pairs) == 32 and ("good 3", "bad 3") in pairs and ("bad 3", "good 3") in pairs  # both orders, blind


def test_unchanged_answers_are_not_judged_again(openai_stub, rows, tmp_path):
    url, seen = openai_stub(fair_judge)
    cfg, judge = judged_config(url, gate="pairwise")
    baseline = [Generation(f"bad {i}", 5.0, 3, 2) for i in range(16)]
    candidate = [Generation("??? unreadable" if i == 0 else f"good {i}", 5.0, 3, 2) for i in range(16)]
    first = compare(cfg, dataset(tmp_path), rows, baseline, candidate, tmp_path, judge=judge)
    asked = len(seen)

    again = compare(cfg, dataset(tmp_path), rows, baseline, candidate, tmp_path, judge=judge)

    # Only the unreadable answer is asked about again: 1 score and 2 pairwise orders, each 1 + 1 retry.
    assert len(seen) - asked == 6
    assert again.candidate == first.candidate and again.baseline == first.baseline
    candidate[5] = Generation("good, changed", 5.0, 3, 2)
    compare(cfg, dataset(tmp_path), rows, baseline, candidate, tmp_path, judge=judge)
    changed = [s["body"]["messages"][-1]["content"] for s in seen[asked + 6 :]]
    assert sum("good, changed" in text for text in changed) == 3  # its score and both pairwise orders
