"""Constrained decoding for `response_format`: at each decode step a request's grammar says which tokens
may come next, the others' logits become -inf, so every answer that ends by itself is JSON that parses and
(for `json_schema`) validates against the schema.

llguidance does the grammar work (benchmarks/RESULTS.md, "Grammar libraries for constrained decoding"): it
compiles the ticket-triage schema in about a millisecond where xgrammar and outlines-core take seconds, so
a new response_format's first request does not wait. outlines-core fills masks faster once compiled, but
its json_object is a regex nesting to a fixed depth that takes 11 s to build; xgrammar let raw control
characters into JSON strings.

The engine's loop, for the rows of a decode step that have a grammar:

    bitmask = allocate_mask(rows, vocab_size)  # one per step; rows left alone allow every token
    for row, matcher in constrained: matcher.fill_mask(bitmask, row)
    apply_mask(logits, bitmask)                # (rows, V), in place
    ... pick each row's token, then matcher.accept(token); matcher.finished -> finish_reason "stop"
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from tuneloop.serve.engine import InvalidRequestError

CACHE_SIZE = 64  # compiled response_formats kept, least recently used dropped first
# json.dumps' separators, the ones answers are trained with, and no other whitespace: with free
# whitespace between tokens small models loop on spaces and newlines until max_tokens.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def allocate_mask(rows: int, vocab_size: int) -> torch.Tensor:
    """A bitmask for `rows` rows of logits, every token allowed: (rows, ceil(vocab_size / 32)) int32 on CPU,
    bit j of word w standing for token 32 * w + j."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the logits of the tokens `bitmask` disallows to -inf, in place; `logits` is (rows, V) on any
    device, `bitmask` as `allocate_mask(rows, V)` made it."""
    rows, vocab_size = logits.shape
    if bitmask.shape != (rows, (vocab_size + 31) // 32):
        raise ValueError(f"a bitmask of shape {tuple(bitmask.shape)} does not fit logits of {(rows, vocab_size)}")
    # (rows, V) uint8, 1 where a token is disallowed; the words are little-endian, token 32 * w + j at bit j
    blocked = np.unpackbits((~bitmask).numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab_size]
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        # numpy, single-threaded: torch's parallel elementwise kernels were 10-50x slower on a busy CPU
        np.copyto(logits.detach().numpy(), -np.inf, where=blocked.view(bool))
    else:
        logits.masked_fill_(torch.from_numpy(blocked).view(torch.bool).to(logits.device), float("-inf"))


class Matcher:
    """One request's place in its grammar. Not thread-safe: a matcher belongs to one request, stepped by
    one decode loop."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_id: int):
        self._matcher = matcher
        self._eos_token_id = eos_token_id
        self._finished = False

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (the whole row is overwritten). Once the JSON
        is complete only the end-of-turn token is allowed."""
        if not 0 <= row < bitmask.shape[0] or bitmask.dtype != torch.int32 or not bitmask.is_contiguous():
            raise ValueError(f"row {row} of a {bitmask.dtype} bitmask of shape {tuple(bitmask.shape)}")
        words = bitmask[row]
        # the library checks the size it is given against its vocabulary; the pointer is ours to get right
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def accept(self, token_id: int) -> None:
        """Advance past `token_id`, which the last filled mask allowed."""
        if not self._matcher.consume_token(token_id):
            raise ValueError(f"token {token_id} is not allowed here: {self._matcher.get_error()}")
        self._finished = token_id == self._eos_token_id

    @property
    def finished(self) -> bool:
        """The JSON is complete and the end-of-turn token was taken: the answer ends with "stop"."""
        return self._finished


class Grammar:
    """A compiled response_format; shared by every request that asks for it."""

    def __init__(self, template: llguidance.LLMatcher, eos_token_id: int):
        self._template = template
        self._eos_token_id = eos_token_id

    def matcher(self) -> Matcher:
        """A fresh matcher for one request (a copy of the compiled one: about a microsecond)."""
        return Matcher(self._template.deep_copy(), self._eos_token_id)


class GrammarCompiler:
    """Compiles response_formats against one model's tokenizer. Building it reads the whole vocabulary
    (0.5-5 s for SmolLM2's 49 152 tokens), so make one per served tokenizer; `compile` is thread-safe."""

    def __init__(self, tokenizer, vocab_size: int):
        """`tokenizer` is a fast Hugging Face tokenizer; `vocab_size` the width of the model's logits (its
        config's vocab_size, which may differ from len(tokenizer)). The stop token is the tokenizer's eos."""
        self.vocab_size = vocab_size
        self._eos_token_id = tokenizer.eos_token_id
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=self._eos_token_id)
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, response_format: dict[str, Any]) -> Grammar:
        """The grammar for `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"name": ...,
        "schema": {...}}}`; raises InvalidRequestError (param "response_format") for anything else or for a
        schema that does not compile. `strict` is always in effect: every answer follows the schema."""
        try:
            key = json.dumps(response_format, sort_keys=True)
        except (TypeError, ValueError) as error:
            raise _invalid(f"response_format is not JSON: {error}") from None
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = Grammar(self._compile_schema(_schema_of(response_format)), self._eos_token_id)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def _compile_schema(self, schema: dict[str, Any]) -> llguidance.LLMatcher:
        try:
            # overrides: our separators win over any "x-guidance" options inside the schema
            source = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as error:
            raise _invalid(f"the schema is not a JSON object: {error}") from None
        template = llguidance.LLMatcher(self._tokenizer, source, log_level=0)
        if template.is_error():
            reason = " ".join(template.get_error().split())
            raise _invalid(f"the schema in response_format cannot be used for constrained decoding: {reason}")
        return template


def _schema_of(response_format: Any) -> dict[str, Any]:
    """The JSON Schema a response_format asks for."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return ANY_OBJECT
    if kind != "json_schema":
        raise _invalid(f"response_format type must be 'json_object' or 'json_schema', not {kind!r}")
    json_schema = response_format.get("json_schema")
    if not isinstance(json_schema, dict):
        raise _invalid("response_format type 'json_schema' needs a 'json_schema' object")
    schema = json_schema.get("schema", ANY_OBJECT)
    if not isinstance(schema, dict):
        raise _invalid(f"response_format json_schema.schema must be an object, not {type(schema).__name__}")
    return schema


def _invalid(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="response_format")
