"""The gate end to end on the tiny model: a candidate adapter that is worse than the baseline is refused,
by `evaluate()` and by `tuneloop eval --gate` (exit code 3)."""

from __future__ import annotations

import json
from pathlib import Path

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset, save_meta
from tuneloop.config import EvalConfig, MetricConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ticket-triage"
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


def test_cli_eval_gate_exits_3_naming_the_failing_metric(tiny_model_dir, tiny_adapter_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "200")
    lines = (EXAMPLE / "data.jsonl").read_text().splitlines()[:40]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "config.yaml").write_text(f"""
name: gate-cli
base_model: {tiny_model_dir}
data:
  path: data.jsonl
  answer_schema: {EXAMPLE / 'schema.json'}
eval:
  max_new_tokens: {NEW_TOKENS}
  bootstrap_resamples: 200
""")
    runner = CliRunner()
    prepared = runner.invoke(app, ["data", "config.yaml"])
    assert prepared.exit_code == 0, prepared.output
    save_meta(adapter_artifact(tiny_adapter_dir), tmp_path / "runs" / "gate-cli" / "train")

    result = runner.invoke(app, ["eval", "config.yaml", "--gate"])

    assert result.exit_code == 3, result.output
    assert "gate FAILED" in result.output and "schema_valid:" in result.output
    assert (tmp_path / "runs" / "gate-cli" / "eval_report.html").is_file()
    without_gate = runner.invoke(app, ["eval", "config.yaml"])
    assert without_gate.exit_code == 0, without_gate.output  # only --gate turns the verdict into an exit code
