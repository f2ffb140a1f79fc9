"""Completion-only masks from the chat template, the prompt round trip into evaluation and serving, and
packed batches that give the same loss and gradients as the examples one by one."""

from __future__ import annotations

import pytest

from tuneloop.train.packing import ATTENTION, pack, register_attention, split_rows
from tuneloop.train.template import IGNORE, encode_example, prompt_ids

CHATS = [
    [
        {"role": "system", "content": "Answer with JSON."},
        {"role": "user", "content": "The invoice export fails with error 500 since this morning."},
        {"role": "assistant", "content": '{"category": "bug", "priority": "high"}'},
    ],
    [
        {"role": "user", "content": "How do I change my password?"},
        {"role": "assistant", "content": '{"category": "how_to"}'},
    ],
    [
        {"role": "system", "content": "Answer with JSON."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello, what can I do for you?"},
        {"role": "user", "content": "Cancel my plan, please. I was charged twice this month and nobody answers."},
        {"role": "assistant", "content": '{"category": "billing", "needs_human": true}'},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def packed_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    register_attention()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.set_attn_implementation(ATTENTION)
    return model.eval()


def test_only_the_answer_and_its_end_of_turn_token_are_trained(tokenizer):
    messages = CHATS[2]
    example = encode_example(tokenizer, messages, max_length=1024)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    untrained = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE]
    text = tokenizer.decode(trained)
    assert text.startswith(messages[-1]["content"] + "<|im_end|>")
    assert "Cancel my plan" in tokenizer.decode(untrained)  # the user turn is masked
    assert "Hello, what can I do" in tokenizer.decode(untrained)  # so is an earlier assistant turn
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in trained  # the model learns to stop
    assert not example.truncated


def test_whole_chat_masking_and_truncation_are_reported(tokenizer):
    example = encode_example(tokenizer, CHATS[0], max_length=10, completion_only=False)
    assert example.truncated and len(example.input_ids) == 10 and IGNORE not in example.labels


def test_training_prompt_is_the_prompt_evaluation_and_serving_build(tokenizer, tiny_model_dir):
    import asyncio

    from tuneloop.artifacts import BaseModelRef
    from tuneloop.config import ServeConfig
    from tuneloop.evaluate.generate import generate_answers
    from tuneloop.serve import build_engine
    from tuneloop.serve.engine import Completion, EngineRequest, Sampling

    for messages in CHATS:
        example = encode_example(tokenizer, messages, max_length=1024)
        first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE)
        training_prompt = example.input_ids[:first_trained]
        assert training_prompt == prompt_ids(tokenizer, messages[:-1])
        assert tokenizer.decode(training_prompt).endswith("<|im_start|>assistant\n")

    base = BaseModelRef("tiny", tiny_model_dir)
    prompts = [m[:-1] for m in CHATS]
    generated = generate_answers(base, None, prompts, max_new_tokens=2, batch_size=2, label="round trip")
    engine = build_engine(ServeConfig(), base, {})

    async def serve_all():
        done = []
        for prompt in prompts:
            async for event in engine.generate(EngineRequest("tiny", Sampling(max_tokens=2), messages=prompt)):
                if isinstance(event, Completion):
                    done.append(event)
        await engine.close()
        return done

    served = asyncio.run(serve_all())
    for messages, gen, done in zip(CHATS, generated, served):
        expected = len(prompt_ids(tokenizer, messages[:-1]))
        assert gen.prompt_tokens == expected
        assert done.prompt_tokens == expected


def _examples(tokenizer):
    return [
        {"input_ids": e.input_ids, "labels": e.labels}
        for e in (encode_example(tokenizer, m, max_length=1024) for m in CHATS)
    ]


def test_packed_batch_gives_the_loss_and_gradients_of_the_examples_one_by_one(tokenizer, packed_model):
    import torch
    import torch.nn.functional as F

    examples = _examples(tokenizer)
    # One by one, with the model's own shifted loss, weighted by trained tokens.
    packed_model.zero_grad()
    total = torch.zeros(())
    count = sum(sum(label != IGNORE for label in e["labels"][1:]) for e in examples)
    for e in examples:
        out = packed_model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]))
        n = sum(label != IGNORE for label in e["labels"][1:])
        (out.loss * n / count).backward()
        total = total + out.loss.detach() * n / count
    separate_grad = packed_model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    # Packed into one row, logits only where a token is trained.
    packed_model.zero_grad()
    batch = pack(examples)
    targets = batch["shift_labels"][0]
    keep = (targets != IGNORE).nonzero().squeeze(-1)
    out = packed_model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
        logits_to_keep=keep, use_cache=False,
    )
    loss = F.cross_entropy(out.logits[0], targets[keep])
    loss.backward()
    packed_grad = packed_model.model.layers[0].self_attn.q_proj.weight.grad

    assert len(keep) == count
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    assert torch.allclose(packed_grad, separate_grad, rtol=1e-4, atol=1e-6)


def test_attention_does_not_cross_example_borders(tokenizer, packed_model):
    """The second example's logits do not depend on the first example's tokens."""
    import torch

    examples = _examples(tokenizer)
    changed = [{**examples[0], "input_ids": [7] * len(examples[0]["input_ids"])}, examples[1]]
    outputs = []
    with torch.no_grad():
        for pair in (examples[:2], changed):
            batch = pack(pair)
            logits = packed_model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                cu_seq_lens_q=batch["cu_seq_lens_q"], use_cache=False,
            ).logits[0]
            outputs.append(logits[len(pair[0]["input_ids"]) :])
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


def test_short_examples_attend_in_fp32_under_cpu_autocast_and_long_ones_in_bf16():
    """Under bf16 autocast on a CPU, attention over an example shorter than CPU_FP32_ATTENTION_BELOW runs in
    fp32 (the flash kernel's faster case there): its output is the fp32 one exactly; a longer one runs in bf16."""
    import torch
    from types import SimpleNamespace

    from tuneloop.train.packing import CPU_FP32_ATTENTION_BELOW, varlen_attention

    torch.manual_seed(0)
    short, long = 40, CPU_FP32_ATTENTION_BELOW + 20
    query = torch.randn(1, 4, short + long, 16)
    key, value = torch.randn(1, 2, short + long, 16), torch.randn(1, 2, short + long, 16)
    bounds = torch.tensor([0, short, short + long], dtype=torch.int32)
    module = SimpleNamespace(training=False)
    exact, _ = varlen_attention(module, query, key, value, None, cu_seq_lens_q=bounds)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = varlen_attention(module, query, key, value, None, cu_seq_lens_q=bounds)
    assert mixed.dtype == torch.float32 and mixed.shape == exact.shape == (1, short + long, 4, 16)
    assert torch.equal(mixed[:, :short], exact[:, :short])
    long_error = (mixed[:, short:] - exact[:, short:]).abs().max()
    assert 1e-4 < long_error < 0.1  # bf16 rounding, not a different result


def test_rows_of_a_step_split_at_example_borders(tokenizer):
    examples = _examples(tokenizer)
    batch = pack(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    rows = split_rows(batch, max_tokens=lengths[0] + lengths[1])
    assert [r["input_ids"].shape[1] for r in rows] == [lengths[0] + lengths[1], lengths[2]]
    assert rows[1]["cu_seq_lens_q"].tolist() == [0, lengths[2]]
    assert rows[1]["position_ids"][0, 0].item() == 0
    assert split_rows(batch, max_tokens=sum(lengths)) == [batch]
    assert len(split_rows(batch, max_tokens=1)) == 3  # an example longer than the budget is a row of its own


def test_a_token_budget_fills_steps_with_short_rows_and_leaves_long_rows_alone():
    from tuneloop.config import TrainConfig
    from tuneloop.train.loop import budget_batch_size, total_steps

    short = [50, 60, 55, 55] * 25  # mean 55 tokens
    cfg = budget_batch_size(TrainConfig(batch_size=4, batch_tokens=1100, learning_rate=2e-4), short)
    assert cfg.batch_size == 20 and total_steps(cfg.model_copy(update={"epochs": 1}), len(short)) == 5
    assert cfg.learning_rate == pytest.approx(1e-3)  # five times the rows per update, five times the rate
    assert budget_batch_size(TrainConfig(batch_size=4, batch_tokens=1100, learning_rate=2e-4), [900] * 10).learning_rate == 2e-4
    assert budget_batch_size(TrainConfig(batch_size=4, batch_tokens=1100), [900] * 10).batch_size == 4
    assert budget_batch_size(TrainConfig(batch_size=4), short).batch_size == 4
    assert budget_batch_size(TrainConfig(method="dpo", batch_size=4, batch_tokens=1100), short).batch_size == 4
