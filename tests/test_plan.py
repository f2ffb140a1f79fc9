"""`tuneloop plan`: tokens, a short measured probe, memory and time per machine, costs against an API, and
the baseline check against `eval.target`, which also stops `tuneloop run` before training."""

from __future__ import annotations

import json

import pytest


def config(model_dir, extra: str = "") -> str:
    return f"""
name: planned
base_model: {model_dir}
data:
  path: data.jsonl
  system_prompt: Reply with a JSON triage object.
train:
  epochs: 2
  batch_size: 4
eval:
  max_new_tokens: 6
plan:
  requests_per_month: 1000000
  api_price_in: 0.15
  api_price_out: 0.60
{extra}"""


def test_plan_measures_a_probe_and_prices_the_run(prepared_project, tiny_model_dir, tmp_path):
    cli = prepared_project(config(tiny_model_dir))
    result = cli("plan", "config.yaml")
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "runs" / "planned" / "plan.json").read_text())

    assert plan["rows"] == {"train": 32, "val": 4, "test": 4}
    assert plan["trained_tokens"] < plan["train_tokens"] and plan["longest_row_tokens"] <= 1024
    assert plan["steps"] == 16 and plan["epochs"] == 2.0
    assert plan["probe"]["steps"] == 2  # at least 2, at most 5 % of the run's steps where that is more
    assert plan["probe"]["step_seconds"] > 0 and plan["train_seconds"] > 16 * plan["probe"]["step_seconds"]
    assert plan["peak_memory_mb"] > 100  # the measured resident peak of a process that trained
    assert set(plan["memory_mb"]) == {"lora", "qlora", "full"}
    assert plan["memory_mb"]["qlora"]["this machine"] is None  # 4-bit training needs a CUDA GPU
    assert plan["memory_mb"]["full"]["L4 24GB"] > plan["memory_mb"]["lora"]["L4 24GB"]
    assert plan["fits"]["L4 24GB"] == ["lora", "qlora", "full"]  # a tiny model fits everywhere
    assert plan["train_seconds_by_machine"]["H100 80GB"] < plan["train_seconds_by_machine"]["L4 24GB"]
    costs = plan["costs"]
    assert costs["serving_machines"] >= 1 and costs["api_usd_per_month"] > 0
    assert costs["break_even_months"] == "never" or costs["break_even_months"] >= 0
    assert plan["fine_tune_recommended"] is True and plan["baseline"] is None
    assert "fine-tuning recommended: yes" in result.output
    assert not (tmp_path / "runs" / "planned" / "train" / "adapter").exists()  # the probe is thrown away


def test_a_baseline_that_reaches_the_target_stops_the_run_before_training(prepared_project, tiny_model_dir, tmp_path):
    # Every answer of the tiny model holds a character (newlines, mostly), so the regex baseline is at 100 %.
    extra = """  metrics:
    - {name: regex, pattern: "(?s).", gate: true}
  target: {metric: regex, value: 0.5}
"""
    cli = prepared_project(config(tiny_model_dir).replace("eval:\n  max_new_tokens: 6\n",
                                                          "eval:\n  max_new_tokens: 6\n" + extra))
    planned = cli("plan", "config.yaml")
    assert planned.exit_code == 0, planned.output
    plan = json.loads((tmp_path / "runs" / "planned" / "plan.json").read_text())
    assert plan["fine_tune_recommended"] is False and plan["baseline"]["met"] is True
    assert plan["baseline"]["intervals"]["zero-shot baseline"] == [1.0, 1.0]
    assert "fine-tuning is not needed: the zero-shot baseline already reaches regex >= 0.5" in planned.output

    ran = cli("run", "config.yaml")
    assert ran.exit_code == 5, ran.output
    assert "nothing was trained" in ran.output
    assert not (tmp_path / "runs" / "planned" / "train").exists()


def test_a_target_on_a_metric_that_is_not_scored_is_a_clear_error(prepared_project, tiny_model_dir):
    cli = prepared_project(config(tiny_model_dir).replace(
        "eval:\n  max_new_tokens: 6\n", "eval:\n  max_new_tokens: 6\n  target: {metric: accuracy, value: 0.9}\n"))
    result = cli("run", "config.yaml")
    assert result.exit_code == 1
    assert "eval.target.metric 'accuracy' is not among the scored metrics" in result.output


@pytest.mark.parametrize("steps, expected", [(16, 2), (59, 2), (60, 3), (1000, 3)])
def test_the_probe_takes_at_most_five_percent_of_the_steps_and_at_least_two(steps, expected):
    from tuneloop.pipeline.plan import probe_size

    assert probe_size(3, steps) == expected


def test_the_memory_peak_follows_the_largest_row_a_step_runs_as():
    from tuneloop.pipeline.plan import largest_row

    assert largest_row([(300, 30), (200, 20), (100, 10)], 1024) == (600, 60)  # one row
    assert largest_row([(900, 90), (800, 80), (100, 10)], 1024) == (900, 90)  # 900 | 800+100
    assert largest_row([(2000, 5), (10, 1)], 1024) == (2000, 5)  # a longer example is a row of its own


def test_the_probe_ends_with_a_step_of_the_longest_batch(prepared_project, tiny_model_dir, tmp_path):
    from tuneloop.artifacts import Adapter, Dataset, load_meta
    from tuneloop.config import load_config
    from tuneloop.models import load_tokenizer
    from tuneloop.pipeline.loop import resolve_base
    from tuneloop.train.estimate import probe
    from tuneloop.train.template import encode_example

    prepared_project(config(tiny_model_dir))
    cfg = load_config(tmp_path / "config.yaml")
    data = load_meta(Dataset, cfg.run_dir / "data", "data")
    base = resolve_base(cfg)
    lines = data.train.read_text().splitlines()
    tokenizer = load_tokenizer(base)
    lengths = {line: len(encode_example(tokenizer, json.loads(line)["messages"], 1 << 30).input_ids) for line in lines}
    longest = sorted(lines, key=lengths.get, reverse=True)[:4]

    measured = probe(cfg.train, data, base, tmp_path / "scratch", 2, longest)
    peak = load_meta(Adapter, tmp_path / "scratch" / "peak" / "train", "train")
    assert peak.train_tokens == sum(lengths[line] for line in longest)  # one step, of exactly those rows
    assert measured.steps == 2 and measured.peak_rss_mb > 100
