"""Many LoRA adapters in one batch, each row with its own, and adapters added or dropped while serving.

Every adapted linear layer holds all adapters' A matrices stacked (sum of ranks, in) and their B matrices
side by side (out, sum of ranks; scaling folded in); a step's rows pick their adapter's block through one
0/1 mask shared by all layers. That is two small matmuls per layer whatever the number of adapters in the
batch, where PEFT's mixed-adapter forward runs a gather, two matmuls and a scatter per adapter and layer
(benchmarks/RESULTS.md, "Serving under load"). PEFT reads the adapter's config and weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from tuneloop.errors import TuneloopError

LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, in), B (out, r) * scaling)
_PREFIX = "base_model.model."  # how PEFT names the wrapped model's modules in a saved adapter


def load_lora(path: Path, model: nn.Module) -> LoraWeights:
    """The LoRA weights of the adapter at `path`, checked against `model` (the base model): every adapted
    module must be one of its linear layers, with matching shapes."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    try:
        config = LoraConfig.from_pretrained(str(path))
        state = load_peft_weights(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - PEFT raises many kinds for missing or broken files
        raise TuneloopError(f"{path}: cannot read the adapter ({type(err).__name__}: {str(err)[:200]})") from None
    if config.use_dora or config.fan_in_fan_out or getattr(config, "lora_bias", False):
        raise TuneloopError(f"{path}: DoRA, LoRA biases and fan-in-fan-out adapters are not served by this engine")
    others = sorted({key for key in state if ".lora_A." not in key and ".lora_B." not in key})
    if others:
        raise TuneloopError(f"{path}: the adapter also changes {others[0]} (modules_to_save or embeddings), "
                            "which this engine cannot serve beside other versions")
    weights: LoraWeights = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module_path = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        b = state[key.replace(".lora_A.", ".lora_B.")]
        module = _linear(model, module_path, path)
        if a.shape != (a.shape[0], module.in_features) or b.shape != (module.out_features, a.shape[0]):
            raise TuneloopError(f"{path}: {module_path} does not fit the base model (adapter {tuple(a.shape)} and "
                                f"{tuple(b.shape)}, layer {module.in_features} -> {module.out_features})")
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module_path), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module_path), config.lora_alpha)
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        weights[module_path] = (a.float(), b.float() * scaling)
    if not weights:
        raise TuneloopError(f"{path}: the adapter holds no LoRA weights")
    return weights


def _linear(model: nn.Module, module_path: str, path: Path) -> nn.Linear:
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        raise TuneloopError(f"{path}: the base model has no layer {module_path}; was it trained on another model?") from None
    if isinstance(module, MultiLoraLinear):
        module = module.base
    if not isinstance(module, nn.Linear):
        raise TuneloopError(f"{path}: {module_path} is a {type(module).__name__}; only linear layers are served")
    return module


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, stack: AdapterStack):
        super().__init__()
        self.base = base
        self.stack = stack
        self.a: torch.Tensor | None = None  # (R, in)
        self.b: torch.Tensor | None = None  # (out, R)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, 1, in)
        out = self.base(x)  # (N, 1, out)
        mask = self.stack.mask
        if mask is None or self.a is None:
            return out
        low = (x.reshape(-1, x.shape[-1]) @ self.a.T).mul_(mask)  # (N, R): other adapters' ranks zeroed
        out.view(-1, out.shape[-1]).addmm_(low, self.b.T)
        return out


class AdapterStack:
    """The adapters a base model serves now, by key. `set` replaces them (between steps); `select` says which
    adapter each row of the next step uses."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        self.model, self.dtype, self.device = model, dtype, device
        self.keys: list[str] = []
        self.mask: torch.Tensor | None = None  # (N, R) for the current step; None: no row uses an adapter
        self._table = torch.zeros(1, 0)  # 0/1 row per adapter, the last row for "no adapter"
        self._layers: dict[str, MultiLoraLinear] = {}

    def set(self, adapters: dict[str, LoraWeights]) -> None:
        self.keys = list(adapters)
        ranks = [max(a.shape[0] for a, _ in weights.values()) for weights in adapters.values()]
        starts = [sum(ranks[:i]) for i in range(len(ranks))]
        total = sum(ranks)
        self._table = torch.zeros(len(ranks) + 1, total)
        for i, (start, rank) in enumerate(zip(starts, ranks)):
            self._table[i, start : start + rank] = 1
        for module_path in {p for weights in adapters.values() for p in weights} - set(self._layers):
            parent_path, _, attribute = module_path.rpartition(".")
            parent = self.model.get_submodule(parent_path)
            self._layers[module_path] = MultiLoraLinear(getattr(parent, attribute), self)
            setattr(parent, attribute, self._layers[module_path])
        for module_path, layer in self._layers.items():
            base = layer.base
            a = torch.zeros(total, base.in_features)
            b = torch.zeros(base.out_features, total)
            for start, weights in zip(starts, adapters.values()):
                if module_path in weights:
                    lora_a, lora_b = weights[module_path]
                    a[start : start + lora_a.shape[0]] = lora_a
                    b[:, start : start + lora_a.shape[0]] = lora_b
            used = any(module_path in weights for weights in adapters.values())
            layer.a = a.to(self.device, self.dtype) if used else None
            layer.b = b.to(self.device, self.dtype) if used else None

    def select(self, rows: list[str | None]) -> None:
        """`rows[i]`: the key of row i's adapter, None for the base model."""
        if not any(rows):
            self.mask = None
            return
        index = {key: i for i, key in enumerate(self.keys)}
        picked = torch.tensor([index[key] if key else -1 for key in rows])
        self.mask = self._table[picked].to(device=self.device, dtype=self.dtype)
