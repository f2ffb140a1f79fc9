"""Further gate opponents: the few-shot baseline (examples from the train split only) and the production
version (the registered version with the `production` alias); and evaluating a full model directory or a
registered version with `tuneloop eval --model`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.artifacts import Adapter, BaseModelRef, Dataset, EvalReport, load_meta, save_meta
from tuneloop.config import EvalConfig, MetricConfig
from tuneloop.evaluate.generate import Generation
from tuneloop.evaluate.harness import compare
from tuneloop.evaluate.shots import draw_shots, with_shots

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ticket-triage"


def chat_row(user: str, answer: str, system: str | None = None) -> dict:
    system_turn = [{"role": "system", "content": system}] if system else []
    return {"messages": [*system_turn, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def splits(tmp_path) -> Dataset:
    train = write_rows(tmp_path / "train.jsonl", [chat_row(f"train q{i}", f"train a{i}", "Sys.") for i in range(20)])
    test = write_rows(tmp_path / "test.jsonl", [chat_row(f"test q{i}", f"test a{i}", "Sys.") for i in range(4)])
    return Dataset(dir=tmp_path, train=train, val=train, test=test, hash="h",
                   split_hashes={"train": "t", "test": "h"}, counts={})


def test_few_shot_examples_are_seeded_and_from_the_train_split_only(splits):
    shots = draw_shots(splits.train, 3, seed=7)

    assert shots == draw_shots(splits.train, 3, seed=7)
    assert shots != draw_shots(splits.train, 3, seed=8)
    assert len({s[0]["content"] for s in shots}) == 3  # without replacement
    for shot in shots:
        assert [m["role"] for m in shot] == ["user", "assistant"]  # the example's system prompt is left out
        assert shot[0]["content"].startswith("train q") and shot[1]["content"] == shot[0]["content"].replace("q", "a")

    prompt = [{"role": "system", "content": "Sys."}, {"role": "user", "content": "test q0"}]
    built = with_shots(prompt, shots)
    assert built[0] == prompt[0] and built[-1] == prompt[-1]
    assert built[1:-1] == [turn for shot in shots for turn in shot]
    assert with_shots([{"role": "user", "content": "x"}], shots)[:2] == shots[0]  # no system prompt: shots first


def test_few_shot_baseline_is_generated_scored_and_gated(tiny_model_dir, splits, tmp_path):
    from tuneloop.evaluate import evaluate

    cfg = EvalConfig(max_new_tokens=3, batch_size=4, bootstrap_resamples=200, baseline_shots=2,
                     metrics=[MetricConfig(name="exact_match", gate=True)])
    report = evaluate(cfg, splits, BaseModelRef("tiny", tiny_model_dir), None, tmp_path, model=tiny_model_dir)

    shots = json.loads((tmp_path / "eval" / "2-shot-baseline" / "shots.json").read_text())
    test_text = splits.test.read_text()
    assert len(shots) == 2 and all(turn["content"] not in test_text for shot in shots for turn in shot)
    assert shots == draw_shots(splits.train, 2, seed=cfg.seed)
    assert set(report.opponents) == {"2-shot baseline"}
    assert "2-shot baseline" in report.opponent_difference and "2-shot baseline" in report.opponent_ci
    failing = {f.split(" vs the ")[1].split(" (")[0] for f in report.gate_failures}
    assert failing == {"baseline", "2-shot baseline"}  # random weights: 0 % everywhere, refused by both


def test_a_full_model_directory_without_tokenizer_answers_with_the_base_tokenizer(tiny_model_dir, tmp_path):
    import shutil

    from tuneloop.evaluate.generate import generate_answers, model_kind

    merged = tmp_path / "merged"
    merged.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, merged / name)
    base = BaseModelRef("tiny", tiny_model_dir)
    prompts = [[{"role": "user", "content": f"Ticket {i}"}] for i in range(3)]

    assert model_kind(merged) == "model"
    as_model = generate_answers(base, merged, prompts, 4, 3, "merged")
    assert [a.text for a in as_model] == [a.text for a in generate_answers(base, None, prompts, 4, 3, "base")]


def answers(texts: list[str]) -> list[Generation]:
    return [Generation(t, 10.0, 5, 5) for t in texts]


def test_candidate_must_beat_the_production_version_too(splits, tmp_path):
    rows = [json.loads(line) for line in splits.test.read_text().splitlines()] * 5  # 20 rows
    right = [r["messages"][-1]["content"] for r in rows]
    cfg = EvalConfig(bootstrap_resamples=200, metrics=[MetricConfig(name="exact_match", gate=True)])
    opponents = {"2-shot baseline": answers(["no"] * 20), "production": answers(right)}

    report = compare(cfg, splits, rows, answers(["no"] * 20), answers(right), tmp_path, opponents=opponents)

    assert report.difference["exact_match"][1] > 0  # beats the baseline with confidence
    assert report.opponent_difference["2-shot baseline"]["exact_match"][1] > 0
    assert report.opponent_difference["production"]["exact_match"] == [0.0, 0.0, 0.0]
    assert report.gate_passed is False
    assert report.gate_failures == [
        "exact_match: +0.0 pts vs the production (95 % CI of the difference [+0.0 pts, +0.0 pts]); "
        "the whole interval must lie above 0"
    ]
    assert report.opponents["production"]["exact_match"] == 1.0
    markdown = (tmp_path / "eval_report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| metric |"))
    assert "| 2-shot baseline | Δ vs 2-shot baseline [95 % CI] | production | Δ vs production [95 % CI] |" in header
    assert "| exact match | 0.0 % [0.0, 0.0] | 100.0 % [100.0, 100.0] | +100.0 pts |" in markdown
    assert (tmp_path / "eval" / "production" / "scored.json").is_file()
    assert load_meta(EvalReport, tmp_path / "eval", "eval") == report


def _adapter(adapter_dir: Path, base_model: str) -> Adapter:
    return Adapter(dir=adapter_dir, base_model=base_model, dataset_hash="h", method="lora", params={}, history=[],
                   train_loss=0.0, val_loss=None, train_tokens=0, train_seconds=0.0)


@pytest.fixture
def project(prepared_project, tiny_model_dir, tmp_path):
    return tmp_path, prepared_project(f"""
name: prod-gate
base_model: {tiny_model_dir}
data:
  path: data.jsonl
  answer_schema: {EXAMPLE / 'schema.json'}
eval:
  max_new_tokens: 4
  bootstrap_resamples: 200
""")


def test_cli_gates_against_the_production_alias(project, tiny_model_dir, tiny_adapter_dir):
    from mlflow import MlflowClient

    from tuneloop.config import RegistryConfig
    from tuneloop.registry import register

    root, cli = project
    data = load_meta(Dataset, root / "runs" / "prod-gate" / "data", "data")
    report = EvalReport(dir=root, rows=0, baseline={}, candidate={})
    register(RegistryConfig(), "prod-gate", _adapter(tiny_adapter_dir, str(tiny_model_dir)), report, data, {})
    without_alias = cli("eval", "config.yaml", "--model", str(tiny_model_dir))
    assert without_alias.exit_code == 0, without_alias.output
    assert load_meta(EvalReport, root / "runs" / "prod-gate" / "eval", "eval").opponents == {}

    MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}").set_registered_model_alias(
        "prod-gate", "production", "1")
    # The candidate: a full model directory (here the base model itself), against the baseline and production.
    result = cli("eval", "config.yaml", "--model", str(tiny_model_dir), "--gate")

    assert result.exit_code == 3, result.output
    assert "opponent: prod-gate version 1 (alias production)" in result.output
    assert "Δ vs production" in result.output
    evaluated = load_meta(EvalReport, root / "runs" / "prod-gate" / "eval", "eval")
    assert set(evaluated.opponents) == {"production"}
    assert any("vs the production" in f for f in evaluated.gate_failures)
    assert any("vs the baseline" in f for f in evaluated.gate_failures)
    production = json.loads((root / "runs" / "prod-gate" / "eval" / "production" / "scored.json").read_text())
    candidate = json.loads((root / "runs" / "prod-gate" / "eval" / "candidate" / "scored.json").read_text())
    baseline = json.loads((root / "runs" / "prod-gate" / "eval" / "baseline" / "scored.json").read_text())
    assert [r["answer"] for r in candidate["rows"]] == [r["answer"] for r in baseline["rows"]]  # full model = base
    assert [r["answer"] for r in production["rows"]] != [r["answer"] for r in baseline["rows"]]  # the adapter

    # A registered version as the candidate, by either name; being production itself, it meets no production.
    for name in ("registry:prod-gate/1", "prod-gate-v1"):
        by_name = cli("eval", "config.yaml", "--model", name)
        assert by_name.exit_code == 0, by_name.output
        again = json.loads((root / "runs" / "prod-gate" / "eval" / "candidate" / "scored.json").read_text())
        assert [r["answer"] for r in again["rows"]] == [r["answer"] for r in production["rows"]]
        assert load_meta(EvalReport, root / "runs" / "prod-gate" / "eval", "eval").opponents == {}

    # A version trained on another base model is refused before anything is generated.
    register(RegistryConfig(), "prod-gate", _adapter(tiny_adapter_dir, "other-base"), report, data, {})
    foreign = cli("eval", "config.yaml", "--model", "prod-gate-v2")
    assert foreign.exit_code == 1
    assert f"prod-gate version 2 was trained on other-base, not on {tiny_model_dir}" in foreign.output


def test_cli_names_what_it_cannot_evaluate(project, tmp_path):
    root, cli = project
    (root / "empty").mkdir()
    for spec, message in [
        ("no-such-thing", "--model no-such-thing: not a directory, a registered version"),
        (str(root / "empty"), "neither a PEFT adapter (adapter_config.json) nor a model directory"),
        ("endpoint", "--model endpoint needs eval.endpoint"),
        ("registry:prod-gate/1", "nothing is registered here yet"),
    ]:
        result = cli("eval", "config.yaml", "--model", spec)
        assert result.exit_code == 1 and message in result.output, result.output
    assert not (root / "mlruns").exists()  # looking a version up did not create an empty registry
