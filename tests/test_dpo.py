"""DPO on the tiny model: the adapter learns to prefer the chosen answers, against the base model as
reference; chat data without rejected answers is refused with one clear line."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import DataConfig, TrainConfig
from tuneloop.data import prepare
from tuneloop.errors import TuneloopError
from tuneloop.train import train

ITEMS = [
    "an apple", "a bicycle", "a violin", "a teapot", "a glacier", "a lantern", "a parrot", "a compass",
    "a volcano", "a sandal", "a trumpet", "a cactus", "a kettle", "a lighthouse", "a penguin", "a hammock",
    "a meteor", "a carousel", "a walnut", "a submarine",
]  # fmt: skip


def write_pairs(path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for item in ITEMS:
            # Short rows: on a CPU every position of every padded sequence is scored against the whole vocabulary.
            row = {"prompt": f"Describe {item}.", "chosen": f'{{"thing": "{item}"}}', "rejected": "No."}
            handle.write(json.dumps(row) + "\n")


def completion_logp(model, tokenizer, prompt: list[dict], answer: str) -> float:
    """Sum of the model's log-probabilities of the answer's tokens after the chat-formatted prompt."""
    import torch

    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full = [*prompt, {"role": "assistant", "content": answer}]
    full_ids = tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
    start = len(prompt_ids["input_ids"])
    assert full_ids[:start] == prompt_ids["input_ids"]
    ids = torch.tensor([full_ids])  # (1, T)
    with torch.inference_mode():
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)  # (T-1, V)
    token_logps = logps.gather(-1, ids[0, 1:, None])[:, 0]  # (T-1,): log p(token t+1 | tokens <= t)
    return float(token_logps[start - 1 :].sum())


def test_dpo_raises_the_chosen_over_rejected_margin(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_pairs(tmp_path / "pairs.jsonl")
    data_cfg = DataConfig(
        path=tmp_path / "pairs.jsonl", format="preference", system_prompt="Be brief.", near_duplicate_threshold=None
    )
    data = prepare(data_cfg, tmp_path)
    base = BaseModelRef("tiny", tiny_model_dir)
    cfg = TrainConfig(method="dpo", max_steps=16, batch_size=4, learning_rate=1e-2, lora_r=8, lora_alpha=16)
    adapter = train(cfg, data, base, tmp_path)

    meta = json.loads((tmp_path / "train" / "meta.json").read_text())
    assert meta["method"] == "dpo" and meta["params"]["dpo_beta"] == 0.1
    assert (adapter.dir / "adapter_model.safetensors").is_file() and (tmp_path / "loss.png").is_file()
    assert [h["step"] for h in adapter.history if "loss" in h] == list(range(1, 17))
    assert adapter.val_loss is not None and adapter.train_tokens > 0

    # The implicit reward margin, computed here independently of the trainer: policy = base + adapter,
    # reference = the same model with the adapter disabled (before training the two are identical, so it is 0).
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter.dir).eval()
    margins = []
    for line in data.train.read_text().splitlines():
        row = json.loads(line)
        logp = functools.partial(completion_logp, policy, tokenizer, row["messages"][:-1])
        trained = logp(row["messages"][-1]["content"]) - logp(row["rejected"])
        with policy.disable_adapter():
            reference = logp(row["messages"][-1]["content"]) - logp(row["rejected"])
        margins.append(trained - reference)
    assert len(margins) >= 14
    assert sum(margins) / len(margins) > 3.0, margins
    assert min(margins) > 0, margins

    # Held-out style preference accuracy (length-normalised likelihoods), as evaluation reports it.
    from tuneloop.evaluate.preference import preference_wins

    rows = [json.loads(line) for line in data.train.read_text().splitlines()][:8]
    tuned, untuned = preference_wins(base, adapter.dir, rows), preference_wins(base, None, rows)
    assert len(tuned) == len(rows) and set(tuned) <= {0.0, 1.0}
    assert sum(tuned) / len(tuned) >= 0.9 and sum(tuned) > sum(untuned), (tuned, untuned)

    # A checkpoint was kept at each epoch's end; a resumed run continues from the newest one.
    assert (tmp_path / "train" / "checkpoints" / "checkpoint-16").is_dir()
    resumed = train(cfg.model_copy(update={"max_steps": 18}), data, base, tmp_path, resume=True)
    assert [h["step"] for h in resumed.history if "loss" in h] == list(range(1, 19))


def test_dpo_without_rejected_answers_is_a_clear_error(tiny_model_dir, tmp_path):
    with (tmp_path / "chat.jsonl").open("w", encoding="utf-8") as handle:
        for item in ITEMS:
            messages = [{"role": "user", "content": f"Describe {item}."}, {"role": "assistant", "content": item}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    data = prepare(DataConfig(path=tmp_path / "chat.jsonl", near_duplicate_threshold=None), tmp_path)
    with pytest.raises(TuneloopError) as raised:
        train(TrainConfig(method="dpo"), data, BaseModelRef("tiny", tiny_model_dir), tmp_path)
    message = str(raised.value)
    assert "\n" not in message
    assert str(data.train) in message
    assert f"{data.counts['train']} of {data.counts['train']} rows have no rejected answer" in message
    assert "preference data" in message and "format: preference" in message
