"""The harness on crafted answers (no model): intervals, flips, the gate verdict and the reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.artifacts import Dataset, EvalReport, load_meta
from tuneloop.config import EvalConfig, MetricConfig
from tuneloop.evaluate.generate import Generation
from tuneloop.evaluate.harness import compare

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ticket-triage"


@pytest.fixture
def rows() -> list[dict]:
    return [json.loads(line) for line in (EXAMPLE / "data.jsonl").read_text().splitlines()[:30]]


def dataset(tmp_path: Path, schema: bool = True) -> Dataset:
    test = tmp_path / "test.jsonl"
    return Dataset(dir=tmp_path, train=test, val=test, test=test, hash="h", split_hashes={"test": "h"}, counts={},
                   answer_schema=EXAMPLE / "schema.json" if schema else None)


def answers(rows: list[dict], wrong_every: int = 0) -> list[Generation]:
    """The reference answers, with an out-of-set category on every `wrong_every`-th row."""
    out = []
    for i, row in enumerate(rows):
        text = row["messages"][-1]["content"]
        if wrong_every and i % wrong_every == 0:
            text = json.dumps(json.loads(text) | {"category": "refund"})
        out.append(Generation(text, 12.0, 40, 30))
    return out


def test_worse_candidate_is_refused_naming_the_failing_metric(rows, tmp_path):
    report = compare(EvalConfig(), dataset(tmp_path), rows, answers(rows), answers(rows, wrong_every=2), tmp_path)

    assert report.gate_passed is False
    assert report.gate_metrics == ["schema_valid"]
    assert len(report.gate_failures) == 1 and report.gate_failures[0].startswith("schema_valid: -50.0 pts vs the baseline")
    delta, low, high = report.difference["schema_valid"]
    assert delta == pytest.approx(-0.5) and low <= high < 0
    assert report.flips["schema_valid"] == {"fixed": [], "broken": list(range(0, 30, 2))}
    assert load_meta(EvalReport, tmp_path / "eval", "eval") == report  # meta.json round trip


def test_better_candidate_passes_and_every_gate_metric_is_checked(rows, tmp_path):
    cfg = EvalConfig(metrics=[
        MetricConfig(name="schema_valid", gate=True),
        MetricConfig(name="classification", field="category", gate=True),
        MetricConfig(name="rouge_l"),
    ])
    report = compare(cfg, dataset(tmp_path), rows, answers(rows, wrong_every=2), answers(rows), tmp_path)
    assert report.gate_passed is True and report.gate_failures == []
    assert report.gate_metrics == ["schema_valid", "category.accuracy"]
    assert set(report.candidate) == {"schema_valid", "category.accuracy", "category.macro_f1", "rouge_l", "latency_ms"}


def test_equal_models_are_refused_too(rows, tmp_path):
    report = compare(EvalConfig(), dataset(tmp_path, schema=False), rows, answers(rows), answers(rows), tmp_path)
    assert report.gate_metrics == ["rouge_l"]  # no schema: the first default metric
    assert report.gate_passed is False and "rouge_l: +0.0 pts" in report.gate_failures[0]


def test_reports_are_self_contained_with_flips_first(rows, tmp_path):
    compare(EvalConfig(), dataset(tmp_path), rows, answers(rows), answers(rows, wrong_every=7), tmp_path)
    html = (tmp_path / "eval_report.html").read_text()
    markdown = (tmp_path / "eval_report.md").read_text()
    assert 'src="data:image/png;base64,' in html
    assert "http://" not in html and "https://" not in html and "<script" not in html and "<link" not in html
    for text in (html, markdown):
        assert "gate FAILED" in text and "(invalid)" in text and "95 % CI of Δ" in text
    side_by_side = markdown.split("side by side (flips first)")[1].splitlines()
    cells = [line.split("|")[1].strip() for line in side_by_side if line.startswith("| ")]
    first_rows = [cell for cell in cells if cell.isdigit()][:5]
    assert first_rows == ["1", "8", "15", "22", "29"]  # the broken rows lead
    assert (tmp_path / "report.md").is_file() and (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_baseline_only_has_no_verdict(rows, tmp_path):
    report = compare(EvalConfig(), dataset(tmp_path), rows, answers(rows), None, tmp_path)
    assert report.gate_passed is None and report.candidate is None
    assert report.baseline_ci["schema_valid"] == [1.0, 1.0]


def test_metric_options_are_checked_against_the_grader():
    with pytest.raises(ValueError, match="needs `pattern`"):
        MetricConfig(name="regex")
    with pytest.raises(ValueError, match="classification( and item_f1)? graders? only"):
        MetricConfig(name="rouge_l", field="category")
    assert EvalConfig().bootstrap_resamples == 1000


def test_free_text_metrics_get_intervals_and_gate_on_a_regex(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"The answer is {i}."}]}
            for i in range(12)]
    baseline = [Generation(f"maybe {i}", 5.0, 3, 3) for i in range(12)]
    candidate = [Generation(f"the answer is {i}", 5.0, 3, 4) for i in range(12)]
    cfg = EvalConfig(bootstrap_resamples=200, metrics=[
        MetricConfig(name="regex", pattern=r"(?i)answer is \d+", gate=True),
        MetricConfig(name="normalized_match"),
        MetricConfig(name="bleu"),
        MetricConfig(name="chrf"),
        MetricConfig(name="classification"),  # the whole answer as a label, labels from the references
    ])
    report = compare(cfg, dataset(tmp_path, schema=False), rows, baseline, candidate, tmp_path)
    assert report.gate_passed is True
    assert report.candidate["normalized_match"] == 1.0 and report.baseline["normalized_match"] == 0.0
    assert report.candidate["bleu"] > report.baseline["bleu"] and report.difference["chrf"][1] > 0
    assert report.candidate["label.accuracy"] == 1.0  # "the answer is 0" is the label "The answer is 0."
    assert report.baseline["label.accuracy"] == 0.0
    assert report.flips["regex"] == {"fixed": list(range(12)), "broken": []}


def test_reports_show_html_in_answers_as_text(rows, tmp_path):
    candidate = answers(rows)
    candidate[0] = Generation('<img src="https://tracker.example/x.png"> & more', 12.0, 40, 30)

    compare(EvalConfig(), dataset(tmp_path), rows, answers(rows), candidate, tmp_path)

    for name in ("eval_report.md", "eval_report.html"):
        text = (tmp_path / name).read_text()
        assert "<img src=\"https://" not in text and "&lt;img src=" in text, name
