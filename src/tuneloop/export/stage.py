"""The export stage: a registered version as a standalone model, either a merged Hugging Face directory or a
GGUF file with an Ollama Modelfile, written whole into a folder or not at all."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from tuneloop.artifacts import Adapter, BaseModelRef, EvalReport, ModelVersion, load_meta
from tuneloop.config import RunConfig
from tuneloop.errors import TuneloopError
from tuneloop.export.card import VersionInfo, gguf_general, model_card
from tuneloop.export.gguf_file import Quant, check_supported, write_gguf
from tuneloop.export.modelfile import modelfile
from tuneloop.models import load_tokenizer, resolve_base_model
from tuneloop.registry import find_version, version_dir, version_run
from tuneloop.train.merge import merged_model

Format = Literal["merged", "gguf"]


def export(
    cfg: RunConfig,
    fmt: Format,
    quant: Quant = "f16",
    version: int | None = None,
    out: Path | None = None,
    force: bool = False,
) -> Path:
    """Export version `version` of the config's registered model (default: the version its bare name serves)
    to `out` (default: runs/NAME/export/NAME-vN-FORMAT) and return that folder. An existing `out` is replaced
    only with `force`; a failed export leaves nothing behind."""
    # 1. what to export, and whether it can be: every check before anything is written
    base = resolve_base_model(cfg.base_model, cfg.cache_dir, cfg.trust_remote_code)
    found = find_version(cfg.registry, cfg.model_name, base.name, version)
    label = "merged" if fmt == "merged" else f"gguf-{quant}"
    target = (out or cfg.run_dir / "export" / f"{found.name}-v{found.version}-{label}").expanduser().resolve()
    if target.exists() and not force:
        raise TuneloopError(f"{target} already exists; pass --force to replace it")
    if target.exists() and not _earlier_export(target):
        raise TuneloopError(f"{target}: --force replaces an earlier export or an empty folder only, not this")
    model_dir = version_dir(cfg.registry, found.name, found.version, base_model=base.name)
    full = not (model_dir / "adapter_config.json").is_file()
    if fmt == "gguf":
        check_supported(_config(model_dir if full else base.path))
    info = _version_info(cfg, base, found, full)

    # 2. write into a hidden folder beside the target, then move it into place
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    partial.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        model = merged_model(base, model_dir)
        tokenizer = _tokenizer(base, model_dir, full)
        if fmt == "merged":
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            files = "safetensors weights, tokenizer, chat template and generation config"
        else:
            name = f"{found.name}-v{found.version}-{quant}.gguf"
            parameters = sum(p.numel() for p in model.parameters())
            write_gguf(model, tokenizer, partial / name, quant, gguf_general(info, parameters))
            (partial / "Modelfile").write_text(modelfile(name, tokenizer, info.system_prompt), encoding="utf-8")
            files = f"`{name}` ({quant} GGUF) and an Ollama `Modelfile`"
        (partial / "README.md").write_text(model_card(info, files), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _earlier_export(folder: Path) -> bool:
    """Whether --force may delete `folder`: an empty folder, or one this stage wrote (its model card says so)."""
    if not folder.is_dir():
        return False
    card = folder / "README.md"
    return not any(folder.iterdir()) or (card.is_file() and "exported by tuneloop" in card.read_text(errors="replace"))


def _config(model_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise TuneloopError(f"{model_dir}: cannot read its config.json ({str(err).splitlines()[0][:200]})") from None


def _tokenizer(base: BaseModelRef, model_dir: Path, full: bool):
    """A full fine-tune saved with its own tokenizer keeps it; an adapter answers with its base's."""
    if full and (model_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(BaseModelRef(str(model_dir), model_dir, base.trust_remote_code))
    return load_tokenizer(base)


def _version_info(cfg: RunConfig, base: BaseModelRef, found: ModelVersion, full: bool) -> VersionInfo:
    run_config, run_metrics = version_run(cfg.registry, found)
    # The system prompt the version was trained and evaluated with; the current config's if the run kept none.
    data = (run_config or {}).get("data") or {}
    system_prompt = data["system_prompt"] if "system_prompt" in data else cfg.data.system_prompt
    return VersionInfo(
        version=found,
        base=base,
        kind="full fine-tune" if full else "LoRA adapter merged into its base",
        system_prompt=system_prompt,
        run_metrics=run_metrics,
        report=_own_evaluation(cfg, found),
    )


def _own_evaluation(cfg: RunConfig, found: ModelVersion) -> EvalReport | None:
    """The run directory's evaluation, when it scored the adapter that became this version (same MLflow run)."""
    try:
        adapter = load_meta(Adapter, cfg.run_dir / "train", "train CONFIG")
        report = load_meta(EvalReport, cfg.run_dir / "eval", "eval CONFIG")
    except (TuneloopError, TypeError, json.JSONDecodeError):
        return None
    if adapter.mlflow_run_id != found.run_id or report.candidate_source != str(adapter.dir.resolve()):
        return None
    return report
