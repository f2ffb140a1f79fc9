"""Constrained decoding through `tuneloop serve`: the bare base model asked for the ticket-triage answer with
the task's JSON schema as `response_format`, against the same requests without it.

    python benchmarks/constrained_decoding.py --prompts 50 --max-tokens 200

`tuneloop serve` runs on the bundled SmolLM2-135M-Instruct with no adapter. Each of the first `--prompts`
ticket-triage user messages, after the task's system prompt, is sent once with
`response_format={"type": "json_schema", "json_schema": {"name": "ticket", "schema": <schema.json>, "strict": true}}`
and once without (all constrained requests first), one request at a time, greedy, streamed. Per side: how
many answers finished with `stop` and with `length`; among the `stop` answers, the share that parse as JSON
and the share that also validate against the schema; time to first token (request sent to first content
delta), mean and median. The server is warmed up with one unconstrained request, so the first constrained
request still pays for compiling the schema (shown as `ttft_first_constrained_s`).
Prints a final JSON line with constrained_valid_share, constrained_stop, constrained_length,
unconstrained_valid_share, ttft_constrained_s, ttft_unconstrained_s and ttft_cost_s (their difference).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from demo_prompts import EXAMPLE, chat_prompts
from serve_load import tuneloop_server  # the benchmark beside this one starts servers

from tuneloop.config import DEFAULT_BASE_MODEL, load_config


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None  # "error": the request failed
    ttft_s: float | None  # None: no content at all
    completion_tokens: int | None


def ask(api, messages: list[dict[str, str]], response_format: dict | None, max_tokens: int) -> Answer:
    """One streamed, greedy request; the time to its first non-empty content delta."""
    extra = {} if response_format is None else {"response_format": response_format}
    start = time.perf_counter()
    try:
        stream = api.chat.completions.create(
            model=DEFAULT_BASE_MODEL,
            messages=messages,
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        return _read(stream, start)
    except Exception as err:  # counted as an error; the other requests still run
        print(f"request failed: {type(err).__name__}: {err}"[:300], file=sys.stderr)
        return Answer("", "error", None, None)


def _read(stream, start: float) -> Answer:
    pieces, finish, ttft, tokens = [], None, None, None
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                ttft = time.perf_counter() - start if ttft is None else ttft
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return Answer("".join(pieces), finish, ttft, tokens)


def valid(text: str, schema: dict) -> tuple[bool, bool]:
    """Whether `text` parses as JSON, and whether it also validates against `schema`."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False, False
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return True, False
    return True, True


def figures(answers: list[Answer], schema: dict) -> dict:
    stopped = [a for a in answers if a.finish_reason == "stop"]
    checks = [valid(a.text, schema) for a in stopped]
    ttfts = [a.ttft_s for a in answers if a.ttft_s is not None]
    tokens = [a.completion_tokens for a in answers if a.completion_tokens is not None]
    return {
        "stop": len(stopped),
        "length": sum(a.finish_reason == "length" for a in answers),
        "json_share": round(sum(j for j, _ in checks) / len(checks), 3) if checks else None,
        "valid_share": round(sum(v for _, v in checks) / len(checks), 3) if checks else None,
        "valid_of_all": round(sum(v for _, v in checks) / len(answers), 3),  # `length` answers count as invalid
        "ttft_s": round(statistics.mean(ttfts), 4) if ttfts else None,
        "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
        "no_content": sum(a.ttft_s is None and a.finish_reason != "error" for a in answers),
        "errors": sum(a.finish_reason == "error" for a in answers),
        "mean_completion_tokens": round(statistics.mean(tokens), 1) if tokens else None,
    }


def main() -> None:
    from openai import OpenAI

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the server")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="of the server")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the server is stopped on a kill too

    prompts = chat_prompts()[: args.prompts]
    schema = json.loads(load_config(EXAMPLE).data.answer_schema.read_text(encoding="utf-8"))
    response_format = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": schema, "strict": True}}
    with tempfile.TemporaryDirectory(prefix="constrained-") as tmp:
        with tuneloop_server(Path(tmp), args.threads, args.dtype, args.startup_timeout) as url:
            with OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=args.request_timeout) as api:
                ask(api, prompts[0], None, args.max_tokens)  # warm-up: first-call costs stay out of both
                constrained = [ask(api, p, response_format, args.max_tokens) for p in prompts]
                unconstrained = [ask(api, p, None, args.max_tokens) for p in prompts]
    c, u = figures(constrained, schema), figures(unconstrained, schema)
    for label, side in (("constrained", c), ("unconstrained", u)):
        print(f"{label}: {json.dumps(side)}", file=sys.stderr)
    cost, cost_p50 = (
        None if c[key] is None or u[key] is None else round(c[key] - u[key], 4) for key in ("ttft_s", "ttft_p50_s")
    )
    print(
        json.dumps(
            {
                "prompts": len(prompts),
                "max_tokens": args.max_tokens,
                "constrained_valid_share": c["valid_share"],
                "constrained_json_share": c["json_share"],
                "constrained_stop": c["stop"],
                "constrained_length": c["length"],
                "unconstrained_valid_share": u["valid_share"],
                "constrained_valid_of_all": c["valid_of_all"],
                "unconstrained_valid_of_all": u["valid_of_all"],
                "unconstrained_json_share": u["json_share"],
                "unconstrained_stop": u["stop"],
                "unconstrained_length": u["length"],
                "ttft_constrained_s": c["ttft_s"],
                "ttft_unconstrained_s": u["ttft_s"],
                "ttft_cost_s": cost,
                "ttft_constrained_p50_s": c["ttft_p50_s"],
                "ttft_unconstrained_p50_s": u["ttft_p50_s"],
                "ttft_cost_p50_s": cost_p50,
                "ttft_first_constrained_s": None if constrained[0].ttft_s is None else round(constrained[0].ttft_s, 4),
                "constrained_mean_completion_tokens": c["mean_completion_tokens"],
                "unconstrained_mean_completion_tokens": u["mean_completion_tokens"],
                "no_content": c["no_content"] + u["no_content"],
                "errors": c["errors"] + u["errors"],
            }
        )
    )


if __name__ == "__main__":
    main()
