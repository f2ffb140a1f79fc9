"""Batched evaluation generation: the prompts' shared prefix is encoded once, and every answer is the one
the model gives to that prompt alone."""

from __future__ import annotations

import pytest

from tuneloop.evaluate.generate import answer_prompts, shared_prefix

SYSTEM = "You triage support tickets. Answer with one JSON object holding the team and the priority."
QUESTIONS = [
    "My invoice is wrong.",
    "The app crashes every time I open the settings page on my phone, since yesterday's update.",
    "Password reset mail never arrives.",
    "Can I get a refund for last month? I was charged twice and support has not answered for a week.",
    "Hi",
]
PROMPTS = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]


def test_shared_prefix_leaves_each_prompt_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]]) == [1, 2]
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4, 5]]) == [1, 2]
    assert shared_prefix([[9, 2], [1, 2]]) == []
    assert shared_prefix([[5]]) == []
    assert shared_prefix([]) == []


def _one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    """Reference answers: each prompt alone through plain `generate`, no padding and no shared cache."""
    import torch

    from tuneloop.train.template import prompt_ids

    texts = []
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, prompt)])
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_batched_answers_equal_each_prompt_generated_alone(tiny_model_dir, tiny_adapter_dir, with_adapter):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.train.template import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if with_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, tiny_adapter_dir)
    model.eval()

    widths = []  # the sequence length of every forward pass
    embed = model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda module, args, output: widths.append(args[0].shape[1]))
    with torch.inference_mode():
        batched = answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2)
    hook.remove()
    with torch.inference_mode():
        alone = _one_at_a_time(model, tokenizer, PROMPTS, 6)

    assert [g.text for g in batched] == alone
    assert sum(g.completion_tokens for g in batched) > 20
    encoded = [prompt_ids(tokenizer, p) for p in PROMPTS]
    prefix = shared_prefix(encoded)
    assert len(prefix) > 20  # the chat header and the system prompt
    assert widths[0] == len(prefix)  # encoded once ...
    assert max(widths[1:]) == max(len(ids) for ids in encoded) - len(prefix)  # ... and never again
    assert [g.prompt_tokens for g in batched] == [len(ids) for ids in encoded]


def test_evaluation_answers_with_the_adapter_merged_as_the_unmerged_adapter_does(tiny_model_dir, tiny_adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.artifacts import BaseModelRef
    from tuneloop.evaluate.generate import load_for_generation

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_adapter_dir)
    _, merged = load_for_generation(BaseModelRef("tiny", tiny_model_dir), tiny_adapter_dir)
    assert not isinstance(merged, PeftModel)  # plain weights: no LoRA matmuls at generation time
    with torch.inference_mode():
        expected = answer_prompts(unmerged.eval(), tokenizer, PROMPTS, max_new_tokens=12, batch_size=2)
        got = answer_prompts(merged.eval(), tokenizer, PROMPTS, max_new_tokens=12, batch_size=2)
    assert [g.text for g in got] == [g.text for g in expected]
    assert sum(g.completion_tokens for g in got) > 20
