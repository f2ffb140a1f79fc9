"""The trained contract of a served version: the system prompt and answer schema it was trained with,
applied to requests that do not bring their own, and the sampling defaults the config sets per model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneloop.artifacts import BaseModelRef
from tuneloop.config import SamplingDefaults, ServeConfig
from tuneloop.registry import SERVING_CONTRACT
from tuneloop.serve.engine import ServedModel


def served_models(base: BaseModelRef, versions: dict[str, Path]) -> tuple[ServedModel, list[ServedModel]]:
    """The base model and each registered version (served name -> directory) as served models, with the
    system prompt and answer schema each version was trained with."""
    served = []
    for name, path in versions.items():
        path = Path(path)
        contract_file = path / SERVING_CONTRACT  # written at registration
        contract = json.loads(contract_file.read_text(encoding="utf-8")) if contract_file.is_file() else {}
        served.append(
            ServedModel(
                name=name,
                path=path,
                parent=base.name,
                kind="adapter" if (path / "adapter_config.json").is_file() else "full",
                system_prompt=contract.get("system_prompt"),
                answer_schema=contract.get("answer_schema"),
            )
        )
    return ServedModel(name=base.name, path=base.path), served


def owner(name: str) -> str | None:
    """The project a fine-tuning job's model belongs to, from its name `ft:<base>:<project>:<suffix>:<job id>`
    (as OpenAI names them); None for every other served name."""
    parts = name.split(":")
    return parts[-3] if parts[0] == "ft" and len(parts) >= 5 else None


def with_system_prompt(messages: list[dict[str, str]], model: ServedModel) -> list[dict[str, str]]:
    """`messages` with the version's system prompt in front, when the client sent no system message."""
    if model.system_prompt is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": model.system_prompt}, *messages]


def response_format(requested: dict[str, Any] | None, model: ServedModel, cfg: ServeConfig) -> dict[str, Any] | None:
    """What constrains the answer: the request's own format, else (with `serve.enforce_schema`) the
    version's answer schema."""
    if requested is not None and requested.get("type") != "text":
        return requested
    if cfg.enforce_schema and model.answer_schema is not None:
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": model.answer_schema, "strict": True}}
    return None


def sampling_defaults(cfg: ServeConfig, model: str) -> SamplingDefaults:
    """The config's sampling defaults for `model`: its own entry over the `*` entry over none."""
    merged: dict[str, Any] = {}
    for key in ("*", model):
        if key in cfg.sampling:
            merged |= cfg.sampling[key].model_dump(exclude_unset=True)
    return SamplingDefaults(**merged)
