from pathlib import Path

import pytest

from tuneloop.config import load_config
from tuneloop.errors import TuneloopError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


MINIMAL = "name: demo\ndata:\n  path: data.jsonl\n"


def test_defaults_follow_common_lora_practice(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    t = cfg.train
    assert (t.lora_r, t.lora_alpha, t.lora_dropout, t.target_modules) == (16, 32, 0.0, "all-linear")
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.epochs) == (1e-3, "cosine", 0.1, 3)
    assert t.completion_only_loss is True
    assert cfg.base_model == "smollm2-135m-instruct"
    assert cfg.trust_remote_code is False
    assert cfg.run_dir == Path("runs/demo")
    assert cfg.data.path == (tmp_path / "data.jsonl").resolve()  # relative to the config file


@pytest.mark.parametrize("method, rate", [("lora", 1e-3), ("qlora", 1e-3), ("dpo", 2e-4), ("full", 2e-5)])
def test_the_default_learning_rate_is_the_methods_and_a_set_one_is_kept(tmp_path, method, rate):
    assert load_config(write(tmp_path, MINIMAL), [f"train.method={method}"]).train.learning_rate == rate
    chosen = load_config(write(tmp_path, MINIMAL), [f"train.method={method}", "train.learning_rate=5e-4"])
    assert chosen.train.learning_rate == 5e-4


def test_a_job_of_another_method_starts_from_that_methods_rate(tmp_path):
    from tuneloop.jobs.config import job_config

    def job(kind):
        values = {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 0.5}
        return {"id": "ftjob-1", "seed": 3, "method": {"type": kind, kind: {"hyperparameters": values}}}

    sft = load_config(write(tmp_path, MINIMAL), ["train.learning_rate=4e-4"])
    data = tmp_path / "train.jsonl"
    assert job_config(sft, job("supervised"), tmp_path / "a", data, None).train.learning_rate == 2e-4
    dpo = job_config(sft, job("dpo"), tmp_path / "b", data, None).train
    assert (dpo.method, dpo.learning_rate) == ("dpo", 1e-4)


def test_set_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.epochs=2", "train.target_modules=[q_proj, v_proj]", "name=other"])
    assert cfg.train.epochs == 2
    assert cfg.train.target_modules == ["q_proj", "v_proj"]
    assert cfg.name == "other"


@pytest.mark.parametrize(
    "text, expected",
    [
        (MINIMAL + "trian:\n  epochs: 1\n", "unknown key 'trian'; did you mean 'train'?"),
        (MINIMAL + "train:\n  lora_rank: 8\n", "unknown key 'train.lora_rank'; did you mean 'train.lora_r'?"),
        (MINIMAL + "train:\n  lr_scheduler: cosinus\n", "train.lr_scheduler"),
        ("name: demo\n", "missing required key 'data'"),
        (MINIMAL + "train: [1, 2\n", "invalid YAML"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, expected):
    with pytest.raises(TuneloopError, match=None) as caught:
        load_config(write(tmp_path, text))
    assert expected in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path / "config.yaml"))


def test_bad_override_is_reported(tmp_path):
    with pytest.raises(TuneloopError, match="expected section.key=value"):
        load_config(write(tmp_path, MINIMAL), ["train.epochs"])
    with pytest.raises(TuneloopError, match="unknown key 'train.epoch'; did you mean 'train.epochs'"):
        load_config(write(tmp_path, MINIMAL), ["train.epoch=1"])


def test_missing_config_file(tmp_path):
    with pytest.raises(TuneloopError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_problem_is_reported_at_once_with_its_suggestion(tmp_path):
    text = MINIMAL + "trian:\n  epochs: 1\neval:\n  max_new_token: 8\n  batch_size: many\n"
    with pytest.raises(TuneloopError) as caught:
        load_config(write(tmp_path, text))
    header, *lines = str(caught.value).splitlines()
    assert header == f"{tmp_path / 'config.yaml'}: 3 problems"
    assert len(lines) == 3
    assert any("unknown key 'trian'; did you mean 'train'?" in line for line in lines)
    assert any("unknown key 'eval.max_new_token'; did you mean 'eval.max_new_tokens'?" in line for line in lines)
    assert any(line.strip().startswith("eval.batch_size: Input should be a valid integer") for line in lines)


def test_a_union_value_of_the_wrong_type_is_one_problem(tmp_path):
    with pytest.raises(TuneloopError) as caught:
        load_config(write(tmp_path, MINIMAL + "train:\n  target_modules: 5\n"))
    assert len(str(caught.value).splitlines()) == 1
    assert "train.target_modules: Input should be a valid string or Input should be a valid list (got 5)" in str(
        caught.value
    )
