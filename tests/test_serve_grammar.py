"""Constrained decoding for response_format: walks through the grammar's masks with the real SmolLM2
tokenizer end in JSON that parses and validates; bad formats are refused as the app's 400s."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from tuneloop.serve import grammar as grammar_module
from tuneloop.serve.engine import InvalidRequestError
from tuneloop.serve.grammar import GrammarCompiler, allocate_mask, apply_mask

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "examples" / "ticket-triage" / "schema.json").read_text())
TICKET_FORMAT = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": SCHEMA, "strict": True}}
MAX_TOKENS = 400


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def vocab_size(tiny_model_dir) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_model_dir).vocab_size


@pytest.fixture(scope="module")
def compiler(tokenizer, vocab_size) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab_size)


def allowed_tokens(bitmask: torch.Tensor, row: int, vocab_size: int) -> np.ndarray:
    bits = np.unpackbits(bitmask[row].numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def random_walk(compiler, tokenizer, response_format, seed: int, close_bias: float = 0.0) -> tuple[str, bool]:
    """Pick uniformly among the allowed tokens (or, with probability `close_bias`, the first allowed of
    end-of-turn, `"`, `}`, `]`, so that walks through unbounded JSON end); the text and whether it finished."""
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    closers = [eos, *tokenizer.convert_tokens_to_ids(['"', "}", "]"])]
    matcher = compiler.compile(response_format).matcher()
    tokens = []
    while not matcher.finished and len(tokens) < MAX_TOKENS:
        bitmask = allocate_mask(1, compiler.vocab_size)
        matcher.fill_mask(bitmask, 0)
        allowed = allowed_tokens(bitmask, 0, compiler.vocab_size)
        assert len(allowed) > 0
        if eos in allowed:  # the JSON is complete: nothing but the end of the turn may follow
            assert allowed.tolist() == [eos]
        ending = [t for t in closers if t in allowed] if rng.random() < close_bias else []
        token = ending[0] if ending else int(rng.choice(allowed))
        matcher.accept(token)
        tokens.append(token)
    assert matcher.finished == (tokens[-1] == eos)  # finished exactly when the end of turn was taken
    return tokenizer.decode(tokens[:-1]), matcher.finished


@pytest.mark.parametrize("seed", range(8))
def test_random_walks_through_the_schema_end_in_valid_answers(compiler, tokenizer, seed):
    text, finished = random_walk(compiler, tokenizer, TICKET_FORMAT, seed)
    assert finished, text
    jsonschema.validate(json.loads(text), SCHEMA)
    assert text.startswith('{"category": "')  # json.dumps' separators, no other whitespace


@pytest.mark.parametrize("seed", range(8))
def test_random_walks_through_json_object_end_in_objects(compiler, tokenizer, seed):
    text, finished = random_walk(compiler, tokenizer, {"type": "json_object"}, seed, close_bias=0.3)
    assert finished, text
    assert isinstance(json.loads(text), dict)


def test_a_json_schema_without_schema_is_any_object(compiler, tokenizer):
    text, finished = random_walk(compiler, tokenizer, {"type": "json_schema", "json_schema": {"name": "x"}}, 0, 0.3)
    assert finished and isinstance(json.loads(text), dict)


def test_greedy_batched_decoding_on_random_logits_ends_and_leaves_free_rows_alone(compiler, tokenizer, vocab_size):
    generator = torch.Generator().manual_seed(0)
    matchers = [compiler.compile(TICKET_FORMAT).matcher() for _ in range(2)]  # rows 0 and 1; row 2 is free
    tokens: list[list[int]] = [[], []]
    for _ in range(MAX_TOKENS):
        if all(m.finished for m in matchers):
            break
        logits = torch.randn(3, vocab_size, generator=generator)  # (B, V)
        bitmask = allocate_mask(3, vocab_size)
        for row, matcher in enumerate(matchers):
            if not matcher.finished:
                matcher.fill_mask(bitmask, row)
        apply_mask(logits, bitmask)
        assert torch.isfinite(logits[2]).all()
        picked = logits.argmax(dim=-1)
        for row, matcher in enumerate(matchers):
            if not matcher.finished:
                matcher.accept(int(picked[row]))
                tokens[row].append(int(picked[row]))
    for row, matcher in enumerate(matchers):
        assert matcher.finished
        jsonschema.validate(json.loads(tokenizer.decode(tokens[row][:-1])), SCHEMA)
    assert tokens[0] != tokens[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_mask_blocks_exactly_the_disallowed_tokens(compiler, tokenizer, vocab_size, dtype):
    matcher = compiler.compile(TICKET_FORMAT).matcher()
    for token in tokenizer.encode('{"category": "', add_special_tokens=False):
        matcher.accept(token)
    bitmask = allocate_mask(2, vocab_size)
    matcher.fill_mask(bitmask, 1)
    logits = torch.randn(2, vocab_size).to(dtype)
    with torch.inference_mode():
        apply_mask(logits, bitmask)
    allowed = set(allowed_tokens(bitmask, 1, vocab_size).tolist())
    assert 0 < len(allowed) < vocab_size
    assert set(torch.isfinite(logits[1]).nonzero().flatten().tolist()) == allowed
    assert torch.isfinite(logits[0]).all()
    with pytest.raises(ValueError):
        apply_mask(torch.zeros(3, vocab_size), bitmask)


def test_a_token_the_mask_disallows_is_refused(compiler, tokenizer):
    matcher = compiler.compile({"type": "json_object"}).matcher()
    with pytest.raises(ValueError, match="not allowed"):
        matcher.accept(tokenizer.convert_tokens_to_ids("a"))
    assert not matcher.finished


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "text"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": "ticket"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": ["type", "object"]}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
        {"type": "json_schema",
         "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 9, "maxLength": 2}}},
        "json_object",
    ],
)
def test_bad_response_formats_are_invalid_requests(compiler, response_format):
    with pytest.raises(InvalidRequestError) as raised:
        compiler.compile(response_format)
    assert raised.value.param == "response_format"
    assert str(raised.value) and "\n" not in str(raised.value)


def test_compiled_grammars_are_cached_by_content(compiler, monkeypatch):
    reordered = {"json_schema": {"strict": True, "schema": SCHEMA, "name": "ticket"}, "type": "json_schema"}
    assert compiler.compile(TICKET_FORMAT) is compiler.compile(reordered)
    assert compiler.compile(TICKET_FORMAT) is not compiler.compile({"type": "json_object"})

    monkeypatch.setattr(grammar_module, "CACHE_SIZE", 2)
    formats = [{"type": "json_schema", "json_schema": {"name": name, "schema": {"type": "object"}}} for name in "abc"]
    a, b = compiler.compile(formats[0]), compiler.compile(formats[1])
    assert compiler.compile(formats[0]) is a  # now b is the least recently used
    compiler.compile(formats[2])
    assert compiler.compile(formats[0]) is a
    assert compiler.compile(formats[1]) is not b
