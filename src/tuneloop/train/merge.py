"""One model from a trained version: a LoRA (or QLoRA) adapter folded into its full-precision base, or a
fully fine-tuned model directory as it is."""

from __future__ import annotations

from pathlib import Path

from tuneloop.artifacts import BaseModelRef
from tuneloop.errors import TuneloopError
from tuneloop.models import load_model


def merged_model(base: BaseModelRef, model_dir: Path):
    """A plain transformers model (no PEFT wrapper) that answers as `base` with the adapter in `model_dir`
    does; a full fine-tune (config.json, no adapter_config.json) loads as it is.

    The base is loaded without quantization (in its own dtype), so a QLoRA adapter is merged into the
    unquantized weights rather than into its 4-bit training copy."""
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(load_model(base), model_dir).merge_and_unload()
        except (RuntimeError, OSError, ValueError) as err:  # e.g. an adapter trained on another base model
            reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise TuneloopError(f"{model_dir}: cannot merge it into {base.name}: {reason}") from None
    elif (model_dir / "config.json").is_file():
        model = load_model(BaseModelRef(str(model_dir), model_dir, base.trust_remote_code))
    else:
        raise TuneloopError(f"{model_dir}: neither a PEFT adapter (adapter_config.json) nor a model (config.json)")
    model.eval()
    return model
