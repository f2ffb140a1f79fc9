"""The gate end to end on the tiny model: a candidate adapter that is worse than the baseline is refused,
by `evaluate()` and by `tuneloop eval --gate` (exit code 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset, save_meta
from tuneloop.config import EvalConfig, MetricConfig

NEW_TOKENS = 6


def adapter_artifact(adapter_dir: Path) -> Adapter:
    return Adapter(dir=adapter_dir, base_model="tiny", dataset_hash="h", method="lora", params={}, history=[],
                   train_loss=0.0, val_loss=None, train_tokens=0, train_seconds=0.0)


def test_evaluate_refuses_an_adapter_worse_than_the_base(tiny_model_dir, tiny_adapter_dir, tmp_path):
    from tuneloop.evaluate import evaluate
    from tuneloop.evaluate.generate import generate_answers

    # The references are the base model's own greedy answers, so the baseline is right on every row and
    # the adapter (large random LoRA weights) can only lose.
    base = BaseModelRef("tiny", tiny_model_dir)
    prompts = [[{"role": "user", "content": f"Ticket {i}: my invoice {i * 7} is wrong."}] for i in range(8)]
    references = generate_answers(base, None, prompts, NEW_TOKENS, 8, "references")
    test = tmp_path / "test.jsonl"
    test.write_text("".join(
        json.dumps({"messages": [*p, {"role": "assistant", "content": r.text}]}) + "\n" for p, r in zip(prompts, references)
    ))
    data = Dataset(dir=tmp_path, train=test, val=test, test=test, hash="h", split_hashes={"test": "h"}, counts={})
    cfg = EvalConfig(max_new_tokens=NEW_TOKENS, batch_size=8, bootstrap_resamples=200,
                     metrics=[MetricConfig(name="exact_match", gate=True), MetricConfig(name="rouge_l")])

    report = evaluate(cfg, data, base, adapter_artifact(tiny_adapter_dir), tmp_path)

    assert report.baseline["exact_match"] == 1.0
    assert report.candidate["exact_match"] < 1.0
    assert report.gate_passed is False
    assert [f.split(":")[0] for f in report.gate_failures] == ["exact_match"]
    assert (tmp_path / "eval_report.html").is_file() and (tmp_path / "eval_report.md").is_file()
    for side in ("baseline", "candidate"):
        row = json.loads((tmp_path / "eval" / side / "scored.json").read_text())["rows"][0]
        assert row["latency_ms"] > 0 and row["completion_tokens"] > 0 and row["prompt_tokens"] > 0


@pytest.fixture
def cli_project(prepared_project, tiny_model_dir, tiny_adapter_dir, tmp_path):
    """A prepared run with the random adapter as its trained adapter; returns a function running the CLI
    there. The gate metric is a regex asking for a blank answer: the tiny random base model answers every
    held-out row with newlines only, so the baseline scores 100 % and the adapter can only lose."""
    rows = [[{"role": "user", "content": f"Ticket {i}: my invoice {i * 7} is wrong."},
             {"role": "assistant", "content": "billing"}] for i in range(8)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    cli = prepared_project(f"""
name: gate-cli
base_model: {tiny_model_dir}
data:
  path: data.jsonl
  test_path: test.jsonl
eval:
  max_new_tokens: {NEW_TOKENS}
  bootstrap_resamples: 200
  metrics:
    - {{name: regex, pattern: '\\A\\s*\\Z', gate: true}}
    - {{name: rouge_l}}
""")
    save_meta(adapter_artifact(tiny_adapter_dir), tmp_path / "runs" / "gate-cli" / "train")
    return cli


def test_cli_eval_gate_exits_3_naming_the_failing_metric(cli_project, tmp_path):
    result = cli_project("eval", "config.yaml", "--gate")

    assert result.exit_code == 3, result.output
    assert "gate FAILED" in result.output and "regex:" in result.output
    report = json.loads((tmp_path / "runs" / "gate-cli" / "eval" / "meta.json").read_text())
    assert report["baseline"]["regex"] == 1.0 and report["candidate"]["regex"] < 1.0
    assert (tmp_path / "runs" / "gate-cli" / "eval_report.html").is_file()
    without_gate = cli_project("eval", "config.yaml")
    assert without_gate.exit_code == 0, without_gate.output  # only --gate turns the verdict into an exit code
    refused = cli_project("registry", "register", "config.yaml")
    assert refused.exit_code == 1 and "did not beat the baseline" in refused.output


def test_reports_name_a_model_given_with_model_and_register_refuses_its_scores(cli_project, tiny_model_dir, tmp_path):
    result = cli_project("eval", "config.yaml", "--model", str(tiny_model_dir))

    assert result.exit_code == 0, result.output
    assert f"baseline vs {tiny_model_dir}" in result.output
    markdown = (tmp_path / "runs" / "gate-cli" / "eval_report.md").read_text()
    assert f"baseline vs {tiny_model_dir} on 8 held-out test rows" in markdown
    assert "fine-tuned" not in markdown
    # The scores belong to the base model directory, not to the run's adapter: not registrable as it.
    refused = cli_project("registry", "register", "config.yaml", "--set", "eval.enforce_gate=false")
    assert refused.exit_code == 1, refused.output
    assert f"scored {tiny_model_dir}" in refused.output and "without --model" in refused.output


def test_baseline_only_with_gate_or_model_is_refused(cli_project):
    for extra in (["--gate"], ["--model", "endpoint"]):
        result = cli_project("eval", "config.yaml", "--baseline-only", *extra)
        assert result.exit_code == 1
        assert "--baseline-only scores no candidate" in result.output


def test_model_directories_without_weights_or_for_another_base_are_clear_errors(tiny_model_dir, tmp_path):
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneloop.errors import TuneloopError
    from tuneloop.evaluate.generate import generate_answers, model_kind

    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(tiny_model_dir / "config.json", empty / "config.json")
    with pytest.raises(TuneloopError, match="model directory without weights"):
        model_kind(empty)

    # An adapter trained on a smaller model of the same family: its matrices do not fit the base.
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    foreign = tmp_path / "foreign-adapter"
    get_peft_model(other, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(foreign)
    with pytest.raises(TuneloopError, match="cannot (load it on|merge it into) tiny"):
        generate_answers(BaseModelRef("tiny", tiny_model_dir), foreign, [[{"role": "user", "content": "hi"}]], 2, 1, "x")


def test_a_baseline_only_evaluation_leaves_no_earlier_candidate_behind(cli_project, tmp_path):
    run = tmp_path / "runs" / "gate-cli"
    assert cli_project("eval", "config.yaml").exit_code == 0
    assert (run / "eval" / "candidate" / "scored.json").is_file() and (run / "eval_report.html").is_file()

    result = cli_project("eval", "config.yaml", "--baseline-only")

    assert result.exit_code == 0, result.output
    assert json.loads((run / "eval" / "meta.json").read_text())["candidate"] is None
    assert sorted(p.name for p in (run / "eval").iterdir() if p.is_dir()) == ["baseline"]
    assert not any((run / name).exists() for name in ("eval_report.html", "eval_report.md", "report.md", "metrics.png"))
