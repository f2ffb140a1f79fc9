"""The run configuration: one YAML file, validated by pydantic, with `--set key=value` overrides."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneloop.errors import TuneloopError

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
# train.learning_rate when it is not set. LoRA's comes from the quality suite's sweep (benchmarks/RESULTS.md);
# DPO's is the rate its suite task was measured at; full fine-tuning changes every weight, so it takes far less.
DEFAULT_LEARNING_RATES = {"lora": 1e-3, "qlora": 1e-3, "dpo": 2e-4, "full": 2e-5}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Section):
    path: Path = Field(
        description="Training examples: a JSONL, CSV or text file, or a directory of them (chat `messages`, "
        "Alpaca, ShareGPT, `prompt`/`completion`, `prompt`/`chosen`/`rejected`, OpenAI's DPO format "
        "`input`/`preferred_output`/`non_preferred_output`, or plain text)."
    )
    test_path: Path | None = Field(
        default=None, description="Optional held-out test file; when given, it is the test split and never trained on."
    )
    val_path: Path | None = Field(
        default=None, description="Optional validation file; when given, it is the validation split (val_fraction unused)."
    )
    synthetic_path: Path | None = Field(
        default=None,
        description="Reviewed synthetic rows (`tuneloop review` writes them): checked like every row, dropped where "
        "they duplicate a real row or copy a test row, trained on only (never in the validation or test split).",
    )
    system_prompt: str | None = Field(
        default=None, description="System prompt added to every example that has none; the baseline uses it too."
    )
    answer_schema: Path | None = Field(
        default=None, description="JSON schema the assistant's answer must follow (enables schema metrics)."
    )
    val_fraction: float = Field(default=0.1, ge=0.0, lt=0.5, description="Share of rows held out for validation.")
    test_fraction: float = Field(default=0.1, ge=0.0, lt=0.5, description="Share of rows held out for the test set.")
    seed: int = Field(default=42, description="Seed of the split; the same seed and input give the same split.")
    max_reject_fraction: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Stop the run when more than this share of rows is rejected."
    )
    format: Literal[
        "auto", "chat", "alpaca", "sharegpt", "prompt_completion", "preference", "openai_preference", "csv", "text"
    ] = Field(
        default="auto",
        description="Row format of every data file; `auto` decides per file from its extension and first row.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="CSV only: row key -> column name, e.g. {prompt: question, completion: answer}.",
    )
    fix_line_ends: bool = Field(
        default=False, description="Strip a byte-order mark and CRLF line endings instead of rejecting those rows."
    )
    max_tokens: int | None = Field(
        default=None, gt=0, description="Reject rows longer than this many tokens (default: the base model's context)."
    )
    near_duplicate_threshold: float | None = Field(
        default=0.85,
        gt=0.0,
        le=1.0,
        description="Rows whose word 5-grams have at least this Jaccard similarity are near duplicates; null: off.",
    )
    min_answer_chars: int = Field(default=1, ge=0, description="Remove rows whose answer is shorter than this.")
    max_row_chars: int = Field(default=100_000, gt=0, description="Remove rows longer than this many characters.")
    drop_refusals: bool = Field(default=True, description="Remove rows whose answer is refusal boilerplate.")
    pii_action: Literal["redact", "drop", "keep"] = Field(
        default="redact",
        description="Rows with emails, phones, card numbers, IBANs, IPs or secrets: replace each with [KIND], "
        "drop the row, or keep it as is (counted in every case).",
    )
    pii_patterns: dict[str, str] = Field(
        default_factory=dict, description="Extra personal-data regexes by kind name, handled like the built-in ones."
    )
    perplexity_percentile: float | None = Field(
        default=None,
        gt=0.0,
        lt=100.0,
        description="Score training rows with the base model and drop those above this perplexity percentile.",
    )
    label_field: str | None = Field(
        default=None,
        description="Stratify the split on this field of a JSON answer (label answers are stratified anyway).",
    )

    @field_validator("pii_patterns")
    @classmethod
    def _compiles(cls, patterns: dict[str, str]) -> dict[str, str]:
        for name, pattern in patterns.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"pii_patterns.{name} is not a valid regex: {err}") from None
        return patterns


class TrainConfig(Section):
    method: Literal["lora", "qlora", "full", "dpo"] = Field(
        default="lora",
        description="`lora`, `qlora` (4-bit NF4 base via bitsandbytes; needs a CUDA GPU), `full` (every weight "
        "trained), or `dpo` (LoRA trained on preference pairs with DPO; the data "
        "needs a rejected answer per row).",
    )
    lora_r: int = Field(default=16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(default=32, gt=0, description="LoRA alpha (scaling numerator).")
    lora_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="Dropout on the LoRA path's input. Off by default: on a CPU drawing its random mask cost a third "
        "of a short-row training step (benchmarks/RESULTS.md).",
    )
    target_modules: str | list[str] = Field(
        default="all-linear", description="Modules that get adapters: `all-linear` or a list of module names."
    )
    learning_rate: float | None = Field(
        default=None, gt=0,
        description="Peak learning rate (default by method: "
        + ", ".join(f"`{method}` {rate:g}" for method, rate in DEFAULT_LEARNING_RATES.items())
        + "; LoRA's was chosen on the quality suite, benchmarks/RESULTS.md).",
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Learning-rate decay.")
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    epochs: float = Field(default=3.0, gt=0, description="Passes over the training split.")
    max_steps: int | None = Field(default=None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(default=4, gt=0, description="Examples per device per step.")
    batch_tokens: int | None = Field(
        default=None,
        gt=0,
        description="SFT: fill each step with about this many tokens: as many rows as the budget holds at the "
        "training rows' mean length (batch_size the least), the learning rate raised in the same proportion. "
        "Short rows train faster per token (1.2x on a CPU at 1024 tokens: benchmarks/RESULTS.md).",
    )
    gradient_accumulation: int = Field(default=1, gt=0, description="Steps to accumulate before an update.")
    max_seq_length: int = Field(default=1024, gt=0, description="Longest tokenized example.")
    completion_only_loss: bool = Field(default=True, description="Train on the assistant's answer only.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto",
        description="Matmul precision: `auto` is bf16 mixed precision on GPUs and CPUs that compute bf16 natively "
        "(avx512_bf16/AMX), else fp32. Weights and optimizer state stay fp32.",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: less memory, about 30 % slower."
    )
    eval_steps: int | None = Field(
        default=None, gt=0, description="Validation loss every N steps (default: four times per run)."
    )
    save_steps: int = Field(
        default=50, gt=0, description="Checkpoint every N steps and at each epoch's end, for `train --resume`."
    )
    early_stopping_patience: int | None = Field(
        default=None, gt=0, description="Stop after this many validations without a lower validation loss."
    )
    dpo_beta: float = Field(
        default=0.1,
        gt=0.0,
        description="dpo: how strongly the adapter is held to the base model (higher: closer to it).",
    )
    seed: int = Field(default=42, description="Seed for adapter init and data order.")
    distributed: Literal["none", "ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp"] = Field(
        default="none",
        description="Train with several processes under `accelerate launch`: `ddp` (a full copy per process; on a "
        "CPU-only machine, gloo), `deepspeed-zero2`/`deepspeed-zero3` (optimizer state, plus weights with zero3, "
        "sharded; needs CUDA and deepspeed) or `fsdp` (weights sharded; needs CUDA). batch_size stays per process.",
    )
    num_processes: int | None = Field(
        default=None,
        gt=0,
        description="Processes of a distributed run (default: every visible GPU; 2 on a machine without one).",
    )

    @model_validator(mode="after")
    def _method_learning_rate(self) -> TrainConfig:
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATES[self.method]
        return self

    @model_validator(mode="after")
    def _processes_need_a_distributed_run(self) -> TrainConfig:
        if self.num_processes is not None and self.distributed == "none":
            raise ValueError("num_processes applies to a distributed run; set train.distributed too")
        return self


# Graders cheap enough to run at every validation during training: no judge model, no embedding model.
CheckpointGrader = Literal[
    "exact_match",
    "normalized_match",
    "regex",
    "json_valid",
    "schema_valid",
    "field_accuracy",
    "classification",
    "rouge_l",
    "bleu",
    "chrf",
    "item_f1",
]
GraderName = Literal[CheckpointGrader, "embedding_similarity", "judge", "pairwise", "preference_accuracy"]


class MetricConfig(Section):
    name: GraderName = Field(description="The grader that scores every answer against its reference.")
    gate: bool = Field(
        default=False, description="Promote only when the fine-tune beats the baseline here (CI of the difference > 0)."
    )
    field: str | None = Field(
        default=None,
        description="classification: the JSON field holding the label (default: the whole answer); item_f1: the "
        "field holding the list of objects (default: the answer is the list).",
    )
    keys: list[str] | None = Field(
        default=None,
        description="item_f1: the item fields two items are matched on (default: every field of the reference's "
        "items); strings compared without case, whitespace collapsed.",
    )
    labels: list[str] | None = Field(
        default=None, description="classification: the label set (default: the schema's enum, else the references')."
    )
    fields: list[str] | None = Field(
        default=None, description="field_accuracy: fields compared (default: the schema's closed-valued fields)."
    )
    pattern: str | None = Field(default=None, description="regex: the answer must contain a match of this pattern.")

    @model_validator(mode="after")
    def _options_fit_the_grader(self) -> MetricConfig:
        if self.name == "regex" and not self.pattern:
            raise ValueError("the regex grader needs `pattern`")
        if self.pattern is not None and self.name != "regex":
            raise ValueError("`pattern` applies to the regex grader only")
        if self.labels is not None and self.name != "classification":
            raise ValueError("`labels` applies to the classification grader only")
        if self.field is not None and self.name not in ("classification", "item_f1"):
            raise ValueError("`field` applies to the classification and item_f1 graders only")
        if self.keys is not None and self.name != "item_f1":
            raise ValueError("`keys` applies to the item_f1 grader only")
        if self.fields is not None and self.name != "field_accuracy":
            raise ValueError("`fields` applies to the field_accuracy grader only")
        return self


DEFAULT_RUBRIC = """Score the answer from 1 to 5 against the reference answer:
5: as correct and complete as the reference, in the requested format;
4: correct with a small omission or format slip;
3: partly correct;
2: mostly wrong or off-format;
1: wrong, empty or off-topic."""


class EndpointConfig(Section):
    base_url: str = Field(description="Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="Model name sent with every request.")
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the API key (none: the requests carry no real key)."
    )
    concurrency: int = Field(default=4, gt=0, description="Requests in flight at once.")
    max_retries: int = Field(
        default=4,
        ge=0,
        description="Retries of one request after HTTP 408/409/429/5xx, a timeout or a lost connection, "
        "with exponential back-off (0.5 s doubling, at most 8 s, or the server's Retry-After).",
    )
    timeout_s: float = Field(default=120.0, gt=0, description="Seconds to wait for one reply.")


class JudgeConfig(EndpointConfig):
    rubric: str = Field(
        default=DEFAULT_RUBRIC, description="judge metric: the 1-5 rubric the judge model scores each answer on."
    )
    parse_retries: int = Field(
        default=2,
        ge=0,
        description="Times a judgment whose score or verdict cannot be read is asked for again; after that it "
        "counts as unparsed (reported, left out of the mean).",
    )
    max_tokens: int = Field(default=256, gt=0, description="Longest judgment.")


class TargetConfig(Section):
    metric: str = Field(description="The metric as the reports name it, e.g. schema_valid, label.accuracy, rouge_l.")
    value: float = Field(description="The score that is good enough (metrics are 0..1).")


class EvalConfig(Section):
    max_new_tokens: int | None = Field(
        default=None, gt=0,
        description="Longest generated answer (default: the longest training answer in tokens plus a quarter, at "
        "least 16 more, so no answer of the reference's length is cut). Answers that reach it are counted as "
        "`truncated` in the reports.",
    )
    batch_size: int = Field(default=32, gt=0, description="Prompts generated together (one KV cache, greedy).")
    max_rows: int | None = Field(default=None, gt=0, description="Evaluate only the first N test rows.")
    metrics: list[MetricConfig] = Field(
        default_factory=list,
        description="Graders to run (default: JSON validity, schema compliance, per-field and label accuracy, "
        "ROUGE-L and exact match with a schema; ROUGE-L and exact match without). The gate defaults to "
        "schema compliance with a schema, else the first metric.",
    )
    bootstrap_resamples: int = Field(
        default=1000, ge=100, description="Bootstrap resamples for the 95 % confidence intervals."
    )
    seed: int = Field(default=0, description="Seed of the bootstrap resampling and of the few-shot draw.")
    baseline_shots: int = Field(
        default=0,
        ge=0,
        description="With k > 0, a second baseline gets k examples drawn (seeded) from the train split as "
        "user/assistant turns after the system prompt; the candidate must beat both baselines.",
    )
    endpoint: EndpointConfig | None = Field(
        default=None, description="An OpenAI-compatible endpoint evaluated with `tuneloop eval CONFIG --model endpoint`."
    )
    judge: JudgeConfig | None = Field(
        default=None, description="The judge model for the `judge` (1-5 rubric) and `pairwise` (blind A/B) metrics."
    )
    enforce_gate: bool = Field(
        default=True,
        description="`tuneloop run` and `registry register`: when the fine-tune fails the gate, register nothing "
        "(run exits with code 3); "
        "false only reports the verdict (smoke tests on toy models).",
    )
    checkpoint_metric: CheckpointGrader | None = Field(
        default=None,
        description="Score the model with this grader on validation rows at every validation during training "
        "and keep the best-scoring checkpoint (not the last); its options (regex pattern, classification "
        "field) come from the eval.metrics entry of the same name. With early stopping, patience counts "
        "validations without a better score. Off by default.",
    )
    checkpoint_rows: int = Field(
        default=32, gt=0, description="checkpoint_metric: validation rows answered at each validation."
    )
    target: TargetConfig | None = Field(
        default=None,
        description="A score that would be good enough. `tuneloop plan` and `tuneloop run` first score the "
        "baselines on the validation rows; when the lower end of a baseline's 95 % interval already reaches "
        "the target, fine-tuning is not needed and `run` stops before training (exit 5; --force trains anyway).",
    )

    @model_validator(mode="after")
    def _judge_metrics_need_a_judge(self) -> EvalConfig:
        judged = [m.name for m in self.metrics if m.name in ("judge", "pairwise")]
        if judged and self.judge is None:
            raise ValueError(f"metric {judged[0]} needs eval.judge (base_url, model)")
        return self

    @model_validator(mode="after")
    def _checkpoint_regex_has_a_pattern(self) -> EvalConfig:
        if self.checkpoint_metric == "regex" and not any(m.name == "regex" for m in self.metrics):
            raise ValueError("checkpoint_metric regex needs a regex entry with `pattern` in eval.metrics")
        return self


class RegistryConfig(Section):
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; default: a SQLite store in ./mlruns of the working directory."
    )
    model_name: str | None = Field(default=None, description="Registered model name (default: the run name).")


class SamplingDefaults(Section):
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, description="Temperature when a request sets none; 0 or null: greedy."
    )
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling share when a request sets none.")
    max_tokens: int | None = Field(default=None, gt=0, description="`max_tokens` when a request sets none.")


class VllmConfig(Section):
    command: list[str] = Field(
        default_factory=lambda: ["vllm", "serve"],
        description="How to start vLLM's OpenAI server (the base model's directory and the options follow).",
    )
    port: int = Field(default=8100, gt=0, lt=65536, description="Loopback port vLLM listens on.")
    max_loras: int = Field(default=8, gt=0, description="Adapters vLLM keeps on the GPU at once (`--max-loras`).")
    max_lora_rank: int = Field(default=64, gt=0, description="Largest adapter rank vLLM accepts (`--max-lora-rank`).")
    startup_timeout: float = Field(default=600.0, gt=0, description="Seconds to wait for vLLM to answer /health.")
    extra_args: list[str] = Field(
        default_factory=list, description="More vLLM options, e.g. [--gpu-memory-utilization, '0.85']."
    )


class ServeConfig(Section):
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, gt=0, lt=65536, description="Port to listen on.")
    max_new_tokens: int = Field(default=256, gt=0, description="Default `max_tokens` when a request gives none.")
    engine: Literal["builtin", "vllm"] = Field(
        default="builtin",
        description="`builtin`: tuneloop's continuous-batching engine (CPU or CUDA); `vllm`: vLLM's server as a "
        "subprocess, for GPU production.",
    )
    max_batch_size: int = Field(
        default=32, gt=0, description="builtin engine: requests decoded together in one step; more wait their turn."
    )
    prefix_cache_size: int = Field(
        default=16, ge=0, description="builtin engine: system-prompt KV caches kept per (served model, prefix); 0: off."
    )
    threads: int | None = Field(default=None, gt=0, description="builtin engine: torch threads (default: torch's).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="builtin engine: weights and KV cache; `auto`: bfloat16 on a GPU or a CPU with native bf16 "
        "(AVX512-BF16/AMX: about twice the decode speed, since decoding reads every weight each step), else float32.",
    )
    enforce_schema: bool = Field(
        default=False,
        description="Constrain every answer of a version that has an answer schema to that schema, also when the "
        "request sets no `response_format`.",
    )
    sampling: dict[str, SamplingDefaults] = Field(
        default_factory=dict,
        description="Sampling defaults per served model name (`*` for every model); a request's own values win.",
    )
    vllm: VllmConfig = VllmConfig()
    api_keys: str | None = Field(
        default=None,
        description="API keys and their projects: a YAML file mapping key -> project, or `env:NAME` for an "
        "environment variable holding `key=project` pairs separated by commas; null: no key needed.",
    )
    max_request_bytes: int = Field(default=1_000_000, gt=0, description="Largest request body accepted (413 above).")
    max_tokens_cap: int = Field(default=4096, gt=0, description="Largest `max_tokens` a request may ask for (400 above).")
    max_queue: int = Field(
        default=64, ge=1, description="Requests waiting beyond the running batch; more are answered 429 with Retry-After."
    )
    reload_interval: float = Field(
        default=5.0, ge=0, description="Seconds between looks at the registry for new versions and alias moves; 0: off."
    )
    shutdown_timeout: float = Field(
        default=30.0, ge=0, description="On SIGTERM, seconds the running requests get to finish before the server exits."
    )


AlertMetric = Literal[
    "volume", "error_rate", "latency_p50_ms", "latency_p95_ms", "schema_valid", "refusal_share", "drift_p_value"
]


class AlertRule(Section):
    metric: AlertMetric = Field(description="What the rule watches, per served version over its window.")
    below: float | None = Field(default=None, description="Fire when the metric is below this.")
    above: float | None = Field(default=None, description="Fire when the metric is above this.")
    window: str = Field(default="1h", description="How far back the rule looks, e.g. 30m, 1h, 7d.")
    min_requests: int = Field(default=1, ge=1, description="Stay quiet while the window holds fewer requests.")

    @field_validator("window")
    @classmethod
    def _window_is_a_duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @model_validator(mode="after")
    def _one_bound(self) -> AlertRule:
        if (self.below is None) == (self.above is None):
            raise ValueError("an alert rule needs exactly one of `below` and `above`")
        return self


class MonitorConfig(Section):
    log_requests: bool = Field(
        default=True, description="`tuneloop serve` writes the request log (off: no log, and no feedback)."
    )
    log_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the request log; default: SQLite in <run_dir>/requests.db. A "
        "postgresql+psycopg:// URL lets several servers share one log.",
    )
    sample_rate: float = Field(
        default=1.0, ge=0.0, le=1.0,
        description="Share of requests whose prompt and answer are kept; the rest keep only id, version, "
        "timing and token counts.",
    )
    pii: Literal["redact", "drop", "keep"] = Field(
        default="redact",
        description="Personal data in logged prompts and answers: replaced by [KIND], the text not kept, or kept.",
    )
    retention_days: float = Field(default=30.0, gt=0, description="Log rows older than this are deleted.")
    drift_false_alarm_rate: float = Field(
        default=0.01, gt=0.0, lt=0.5, description="Chance that the input-drift test fires on traffic that did not drift."
    )
    alert_on_drift: bool = Field(default=True, description="Input drift detected in the window is an alert.")
    alerts: list[AlertRule] = Field(default_factory=list, description="Alert rules checked by `tuneloop monitor`.")
    webhook_url: str | None = Field(default=None, description="Alerts are POSTed here as JSON.")


class RetrainConfig(Section):
    include_good: bool = Field(
        default=False, description="Train on answers rated good as they were given, besides corrected answers."
    )
    golden_share: float = Field(
        default=0.2, ge=0.0, lt=1.0,
        description="Share of feedback rows kept out of training as the production golden set (by a seeded hash).",
    )
    golden_min_rows: int = Field(default=50, gt=0, description="The golden set joins the gate from this many rows.")
    seed: int = Field(default=0, description="Seed of the hash that sends a feedback row to training or golden.")


class SynthConfig(Section):
    """`tuneloop synth`: new training rows written by a teacher model, for review before they train."""

    teacher: EndpointConfig | None = Field(
        default=None, description="The teacher: any OpenAI-compatible chat endpoint and model."
    )
    teacher_terms: str | None = Field(
        default=None,
        description="The terms the teacher's outputs come under (e.g. whether they may train other models); "
        "recorded in the lineage of every dataset version with synthetic rows.",
    )
    max_requests: int | None = Field(
        default=None, gt=0, description="Most requests to the teacher per `synth` (default: 3x what --n needs)."
    )
    rows_per_request: int = Field(default=5, gt=0, le=50, description="New rows asked for in one request.")
    examples_per_request: int = Field(
        default=5, gt=0, description="Training rows shown to the teacher in each request, drawn at random."
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="Sampling temperature of the teacher.")
    max_tokens: int = Field(default=4096, gt=0, description="Longest teacher reply.")
    seed: int = Field(default=0, description="Seed of the examples drawn for each request.")
    judge: bool = Field(
        default=False, description="Score every new row 1-5 with eval.judge's rubric; the score is shown in review."
    )
    min_judge_score: int | None = Field(
        default=None, ge=1, le=5, description="With `judge`, reject new rows the judge scores below this."
    )


class ApiConfig(Section):
    """The OpenAI fine-tuning jobs API that `tuneloop serve` offers beside inference."""

    jobs: bool = Field(default=True, description="Serve /v1/files and /v1/fine_tuning/jobs (with the same API keys).")
    database_url: str | None = Field(
        default=None,
        description="Where files, jobs and the job queue live: default SQLite files in <run_dir>/jobs; a "
        "postgresql:// URL lets workers on several machines take jobs from one queue (their MLflow registry "
        "must then be shared too: registry.tracking_uri).",
    )
    workers: int = Field(
        default=1, ge=0, description="Worker processes `tuneloop serve` starts beside itself; 0: only "
        "`tuneloop worker` processes (on other machines) train.",
    )
    max_concurrent_jobs: int = Field(default=1, gt=0, description="Jobs one worker process trains at once.")
    worker_threads: int | None = Field(
        default=None, gt=0,
        description="CPU threads a training job may use (default: half the cores), so training does not "
        "starve serving; training also runs at a lower scheduling priority.",
    )
    max_file_bytes: int = Field(default=100_000_000, gt=0, description="Largest file `POST /v1/files` accepts.")
    heartbeat_timeout: float = Field(
        default=60.0, gt=0,
        description="Seconds without a sign of life after which a job's worker counts as lost; its job then "
        "resumes from its newest checkpoint (or fails after max_attempts).",
    )
    max_attempts: int = Field(default=3, gt=0, description="Times a job is started before a lost worker fails it.")
    test_fraction: float = Field(
        default=0.1, gt=0.0, lt=0.5, description="Share of a job's training file held out as the test split the gate scores."
    )


class PlanConfig(Section):
    """What `tuneloop plan` prices: training on common GPUs, and serving your traffic yourself or through an API."""

    gpu_prices: dict[str, float] = Field(
        default_factory=lambda: {"this machine": 0.10, "L4 24GB": 0.80, "A100 40GB": 1.50, "H100 80GB": 2.50},
        description="$ per hour of each machine (illustrative on-demand prices; set your own).",
    )
    probe_steps: int = Field(default=3, ge=2, le=20, description="Training steps the time probe runs (at most 5 % of the run).")
    requests_per_month: int | None = Field(default=None, ge=0, description="Your traffic, for the serving costs.")
    prompt_tokens: int | None = Field(
        default=None, gt=0, description="Tokens in per request (default: the test rows' mean prompt)."
    )
    completion_tokens: int | None = Field(
        default=None, gt=0, description="Tokens out per request (default: the test rows' mean answer)."
    )
    api_price_in: float | None = Field(default=None, ge=0, description="The API you would use instead: $ per 1M input tokens.")
    api_price_out: float | None = Field(default=None, ge=0, description="... and $ per 1M output tokens.")
    serving_tokens_per_second: float = Field(
        default=80.9, gt=0,
        description="Generated tokens per second one serving machine sustains (default: measured for the built-in "
        "engine on two CPU cores with the default model in float32, 16 clients, benchmarks/serve_load.py).",
    )
    serving_machine: str = Field(default="this machine", description="The gpu_prices entry that serves.")


def parse_duration(text: str) -> float:
    """Seconds in `30s`, `15m`, `24h` or `7d`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30m, 24h or 7d")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


class RunConfig(Section):
    name: str = Field(description="Name of the task; names the run directory and the registered model.")
    base_model: str = Field(
        default=DEFAULT_BASE_MODEL,
        description="`smollm2-135m-instruct` (bundled), a local Hugging Face model directory, or a hub id.",
    )
    trust_remote_code: bool = Field(default=False, description="Allow model code from the model directory to run.")
    output_dir: Path | None = Field(default=None, description="Run directory (default: runs/<name>).")
    cache_dir: Path = Field(
        default=Path("~/.cache/tuneloop"), description="Where converted base models are cached."
    )
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    retrain: RetrainConfig = RetrainConfig()
    api: ApiConfig = ApiConfig()
    plan: PlanConfig = PlanConfig()
    synth: SynthConfig = SynthConfig()

    @property
    def run_dir(self) -> Path:
        return self.output_dir or Path("runs") / self.name

    @property
    def request_log_url(self) -> str:
        return self.monitor.log_url or f"sqlite:///{(self.run_dir / 'requests.db').resolve()}"

    @property
    def jobs_dir(self) -> Path:
        return (self.run_dir / "jobs").resolve()

    @property
    def model_name(self) -> str:
        return self.registry.model_name or self.name


def load_config(path: Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply `section.key=value` overrides, validate, and resolve relative paths."""
    path = Path(path)
    if not path.is_file():
        raise TuneloopError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.MarkedYAMLError as err:
        line = err.problem_mark.line + 1 if err.problem_mark else 0
        raise TuneloopError(f"{path}:{line}: invalid YAML: {err.problem}") from None
    if not isinstance(raw, dict):
        raise TuneloopError(f"{path}: the config must be a mapping of sections, got {type(raw).__name__}")
    for override in overrides or []:
        _apply_override(raw, override)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems = _describe(err)
        if len(problems) == 1:
            raise TuneloopError(f"{path}: {problems[0]}") from None
        listing = "".join(f"\n  {problem}" for problem in problems)
        raise TuneloopError(f"{path}: {len(problems)} problems{listing}") from None
    return _resolve_paths(cfg, path.parent)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise TuneloopError(f"--set {override!r}: expected section.key=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TuneloopError(f"--set {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value) if value.strip() else ""


def _describe(err: ValidationError) -> list[str]:
    """Every validation problem in one line each, with its key path; a misspelled key also gets the closest
    valid key. The members of a union (`str | list[str]`) fail one by one; they make one line."""
    by_key: dict[tuple, list[dict]] = {}
    for problem in err.errors():
        by_key.setdefault(_walk(problem["loc"])[0], []).append(problem)
    return [_line(key, problems) for key, problems in by_key.items()]


def _line(key: tuple, problems: list[dict]) -> str:
    loc = ".".join(map(str, key))
    problem = problems[0]
    if problem["type"] == "extra_forbidden":
        valid = _valid_keys(key[:-1])
        close = difflib.get_close_matches(str(key[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join([*map(str, key[:-1]), close[0]])!r}?" if close else ""
        return f"unknown key {loc!r}{hint} (valid keys here: {', '.join(valid)})"
    if problem["type"] == "missing":
        return f"missing required key {loc!r}"
    message = " or ".join(dict.fromkeys(p["msg"] for p in problems))
    return f"{loc}: {message} (got {problem.get('input')!r})"


def _valid_keys(parent_key: tuple) -> list[str]:
    model = _walk(parent_key)[1]
    return [] if model is None else list(model.model_fields)


def _walk(loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """The keys of `loc` as written in the YAML (without pydantic's union member tags such as
    `target_modules.str`), and the section they lead to, if they lead to one."""
    annotation: Any = RunConfig
    key: list = []
    for part in loc:
        if get_origin(annotation) in (list, dict):  # `part` is an entry's index or key
            annotation = get_args(annotation)[-1]
        elif (model := _section(annotation)) is not None:
            if str(part) not in model.model_fields:
                return (*key, part), None  # an unknown key
            annotation = model.model_fields[str(part)].annotation
        else:
            break  # a union member's tag: no key of the YAML
        key.append(part)
    return tuple(key), _section(annotation)


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section `annotation` is, also when optional (`JudgeConfig | None`); None for other values."""
    if get_origin(annotation) in (list, dict):
        return None
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    def resolve(p: Path | None) -> Path | None:
        return None if p is None else (p.expanduser() if p.expanduser().is_absolute() else (base / p).resolve())

    data = cfg.data.model_copy(
        update={
            "path": resolve(cfg.data.path),
            "test_path": resolve(cfg.data.test_path),
            "val_path": resolve(cfg.data.val_path),
            "synthetic_path": resolve(cfg.data.synthetic_path),
            "answer_schema": resolve(cfg.data.answer_schema),
        }
    )
    return cfg.model_copy(update={"data": data, "cache_dir": cfg.cache_dir.expanduser()})
