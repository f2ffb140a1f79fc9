"""The score of a checkpoint while it trains: greedy answers to the first validation rows, graded with one
cheap grader. Training calls it at every validation and keeps the best-scoring checkpoint."""

from __future__ import annotations

import json
from itertools import islice

from tuneloop.artifacts import Dataset
from tuneloop.config import EvalConfig, MetricConfig
from tuneloop.errors import TuneloopError
from tuneloop.evaluate import metrics as metric_set
from tuneloop.evaluate.generate import answer_budget, answer_prompts
from tuneloop.train import CheckpointScorer


def checkpoint_scorer(cfg: EvalConfig, data: Dataset) -> CheckpointScorer | None:
    """The scorer of `eval.checkpoint_metric` on up to `eval.checkpoint_rows` validation rows, graded as the
    eval.metrics entry of that name configures it; None when no checkpoint metric is set."""
    if cfg.checkpoint_metric is None:
        return None
    configured = [m for m in cfg.metrics if m.name == cfg.checkpoint_metric]
    spec = configured[0] if configured else MetricConfig(name=cfg.checkpoint_metric)
    schema = json.loads(data.answer_schema.read_text(encoding="utf-8")) if data.answer_schema else None
    if spec.name == "schema_valid" and schema is None:
        raise TuneloopError("eval.checkpoint_metric schema_valid needs data.answer_schema")
    rows = []  # without a validation split, training refuses the scorer before it starts
    if data.counts.get("val"):
        with data.val.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in islice(handle, cfg.checkpoint_rows)]
    prompts = [row["messages"][:-1] for row in rows]
    references = [row["messages"][-1]["content"] for row in rows]
    key = metric_set.metric_key(spec)

    budget: list[int] = [cfg.max_new_tokens] if cfg.max_new_tokens else []

    def score(model, tokenizer) -> float:
        if not budget:
            budget.append(answer_budget(tokenizer, data.train))
        answers = answer_prompts(model, tokenizer, prompts, budget[0], cfg.batch_size)
        return metric_set.grade([spec], references, [a.text for a in answers], schema).metrics[key]

    return CheckpointScorer(name=key, score=score)
