"""LLM-as-judge through an OpenAI-compatible endpoint: a 1-5 rubric score per answer, and blind pairwise
A/B between two answers, judged in both orders.

Replies are read by pure functions; a reply that cannot be read is asked for again `parse_retries`
times and then counted as unparsed, never dropped silently."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuneloop.config import JudgeConfig
from tuneloop.evaluate.endpoint import Endpoint, chat, client, in_parallel

Verdict = Literal["A", "B", "tie"]

SCORE_INSTRUCTION = "Explain briefly, then end with a line `Score: N`, where N is a whole number from 1 to 5."
PAIRWISE_INSTRUCTION = (
    "Which answer is better for the conversation, judged against the reference? Ignore the order in which "
    "the answers are shown and their length. Explain briefly, then end with [[A]] if answer A is better, "
    "[[B]] if answer B is better, or [[C]] for a tie."
)
_SCORE = re.compile(r"(?i)\b(?:score|rating)\b\W{0,5}(?:is\W{0,2})?([1-5])(?:\s*/\s*5)?\b(?!\.\d)")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


@dataclass(frozen=True)
class Judge:
    """A judge model behind an endpoint, with its rubric."""

    endpoint: Endpoint
    rubric: str
    parse_retries: int = 2
    max_tokens: int = 256
    # Readable judgments are kept here by what was asked, so an unchanged question is not paid for twice.
    memo_path: Path | None = None

    @classmethod
    def from_config(cls, cfg: JudgeConfig, api_key: str | None) -> Judge:
        return cls(Endpoint.from_config(cfg, api_key), cfg.rubric, cfg.parse_retries, cfg.max_tokens)


def parse_score(reply: str) -> int | None:
    """The 1-5 score in a judge's reply: the last `Score: N` (or `Rating: N`, `N/5`), a JSON object with
    a `score`, or a reply that is only the digit; None when there is none or it is out of range."""
    text = reply.strip()
    if re.fullmatch(r"[1-5]", text):
        return int(text)
    found = _SCORE.findall(text)
    if found:
        return int(found[-1])
    try:
        value = json.loads(text)
    except ValueError:
        return None
    score = value.get("score") if isinstance(value, dict) else None
    return score if isinstance(score, int) and not isinstance(score, bool) and 1 <= score <= 5 else None


def parse_verdict(reply: str) -> Verdict | None:
    """The verdict in a pairwise judgment: the last [[A]], [[B]] or [[C]] (a tie); None without one."""
    found = _VERDICT.findall(reply)
    if not found:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]]  # type: ignore[return-value]


def pairwise_outcome(candidate_first: Verdict | None, candidate_second: Verdict | None) -> float | None:
    """The candidate's result on one row from the two orders (shown as A, then as B): 1 when it wins in
    both, 0 when it loses in both, 0.5 otherwise (ties and inconsistent verdicts); None if either is
    unparsed."""
    if candidate_first is None or candidate_second is None:
        return None
    wins = (candidate_first == "A") + (candidate_second == "B")
    losses = (candidate_first == "B") + (candidate_second == "A")
    return 1.0 if wins == 2 else 0.0 if losses == 2 else 0.5


def win_rate(outcomes: list[float | None]) -> dict[str, float]:
    """Wins, ties, losses and unparsed rows, and the win rate (ties count half) over the parsed rows."""
    parsed = [o for o in outcomes if o is not None]
    wins, losses = parsed.count(1.0), parsed.count(0.0)
    return {
        "wins": wins,
        "ties": len(parsed) - wins - losses,
        "losses": losses,
        "unparsed": len(outcomes) - len(parsed),
        "win_rate": sum(parsed) / len(parsed) if parsed else float("nan"),
    }


def normalised(score: int | None) -> float | None:
    """A 1-5 score on the 0..1 scale of the other metrics: (score - 1) / 4."""
    return None if score is None else (score - 1) / 4


def score_answers(judge: Judge, prompts: list[list[dict]], references: list[str], answers: list[str]) -> list[int | None]:
    """The judge's 1-5 score of every answer (None: unparsed after the retries)."""
    openai_client = client(judge.endpoint)

    def one(i: int) -> int | None:
        messages = _score_messages(judge.rubric, prompts[i], references[i], answers[i])
        return _ask(openai_client, judge, messages, parse_score, memo)

    with _Memo(judge.memo_path) as memo:
        return in_parallel(one, list(range(len(answers))), judge.endpoint.concurrency)


def compare_answers(
    judge: Judge, prompts: list[list[dict]], references: list[str], candidate: list[str], opponent: list[str]
) -> list[float | None]:
    """The candidate's pairwise outcome on every row (see `pairwise_outcome`), blind: the judge sees only
    "answer A" and "answer B", once in each order."""
    openai_client = client(judge.endpoint)

    def one(job: tuple[int, bool]) -> Verdict | None:
        i, candidate_first = job
        a, b = (candidate[i], opponent[i]) if candidate_first else (opponent[i], candidate[i])
        return _ask(openai_client, judge, _pairwise_messages(prompts[i], references[i], a, b), parse_verdict, memo)

    jobs = [(i, first) for i in range(len(candidate)) for first in (True, False)]
    with _Memo(judge.memo_path) as memo:
        verdicts = in_parallel(one, jobs, judge.endpoint.concurrency)
    return [pairwise_outcome(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(candidate))]


def _ask(openai_client, judge: Judge, messages: list[dict], parse, memo: _Memo):
    key = json.dumps([judge.endpoint.base_url, judge.endpoint.model, judge.max_tokens, messages], sort_keys=True)
    key = hashlib.sha256(key.encode()).hexdigest()
    if (known := memo.get(key)) is not None:
        return known
    for _ in range(judge.parse_retries + 1):
        parsed = parse(chat(openai_client, judge.endpoint, messages, judge.max_tokens).text)
        if parsed is not None:
            memo.put(key, parsed)
            return parsed
    return None  # not remembered: asked again next time


class _Memo:
    """Parsed judgments by question digest, read from and written back to a JSON file (none: in memory)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.known = json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}
        self.lock = threading.Lock()

    def get(self, key: str):
        with self.lock:
            return self.known.get(key)

    def put(self, key: str, value) -> None:
        with self.lock:
            self.known[key] = value

    def __enter__(self) -> _Memo:
        return self

    def __exit__(self, *exc) -> None:  # also after a failed request: what was judged stays paid for
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.known), encoding="utf-8")


def _conversation(prompt: list[dict]) -> str:
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in prompt)


def _score_messages(rubric: str, prompt: list[dict], reference: str, answer: str) -> list[dict]:
    user = (
        f"## Conversation\n{_conversation(prompt)}\n\n## Reference answer\n{reference}\n\n"
        f"## Answer to score\n{answer}\n\n## Rubric\n{rubric}\n\n{SCORE_INSTRUCTION}"
    )
    return [{"role": "system", "content": "You are a strict, impartial grader."}, {"role": "user", "content": user}]


def _pairwise_messages(prompt: list[dict], reference: str, a: str, b: str) -> list[dict]:
    user = (
        f"## Conversation\n{_conversation(prompt)}\n\n## Reference answer\n{reference}\n\n"
        f"## Answer A\n{a}\n\n## Answer B\n{b}\n\n{PAIRWISE_INSTRUCTION}"
    )
    return [{"role": "system", "content": "You are a strict, impartial grader."}, {"role": "user", "content": user}]
