"""Many LoRA adapters in one batch, each row with its own: every adapted linear layer holds all adapters'
A matrices stacked (sum of ranks, in) and B matrices side by side (out, sum of ranks, scaling folded in),
and a step's rows pick their adapter's block through one 0/1 mask shared by all layers.

That is two small matmuls per layer whatever the number of adapters in the batch, where PEFT's
mixed-adapter forward runs a gather, two matmuls and a scatter per adapter and layer (benchmarks/RESULTS.md,
"Serving under load": mixed-adapter throughput). PEFT still loads and checks the adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from tuneloop.errors import TuneloopError


class AdapterRows:
    """Which adapter each row of the current step uses: `mask` (N, sum of ranks), None when no row uses one."""

    def __init__(self, ranks: dict[str, int]):
        self.index = {name: i for i, name in enumerate(ranks)}
        self.total = sum(ranks.values())
        self.offsets: dict[str, int] = {}
        self._table = torch.zeros(len(ranks) + 1, self.total)  # one 0/1 row per adapter; the last: no adapter
        start = 0
        for i, (name, rank) in enumerate(ranks.items()):
            self.offsets[name] = start
            self._table[i, start : start + rank] = 1
            start += rank
        self.mask: torch.Tensor | None = None

    def select(self, adapters: list[str | None], dtype: torch.dtype, device: torch.device) -> None:
        if not any(adapters):
            self.mask = None
            return
        rows = torch.tensor([self.index[name] if name else -1 for name in adapters])
        self.mask = self._table[rows].to(device=device, dtype=dtype)


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, rows: AdapterRows):
        super().__init__()
        self.base = base
        self.register_buffer("a", a)  # (R, in)
        self.register_buffer("b", b)  # (out, R)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, 1, in)
        out = self.base(x)  # (N, 1, out)
        if self.rows.mask is None:
            return out
        low = (x.reshape(-1, x.shape[-1]) @ self.a.T).mul_(self.rows.mask)  # (N, R): other adapters' ranks zeroed
        out.view(-1, out.shape[-1]).addmm_(low, self.b.T)
        return out


def stack_adapters(peft_model) -> tuple[nn.Module, AdapterRows]:
    """The transformers model inside `peft_model` with each LoRA layer replaced by a `MultiLoraLinear`
    holding every loaded adapter, and the `AdapterRows` that steers them."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    names = list(peft_model.peft_config)
    layers = [(path, module) for path, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    ranks = {name: max((m.r[name] for _, m in layers if name in m.r), default=0) for name in names}
    rows = AdapterRows(ranks)
    for path, module in layers:
        if not isinstance(module, LoraLinear):
            raise TuneloopError(f"{path}: adapters on {type(module).__name__} layers are not served; only on linear layers")
        base = module.get_base_layer()
        a = base.weight.new_zeros(rows.total, base.in_features)
        b = base.weight.new_zeros(base.out_features, rows.total)
        for name in names:
            if name not in module.lora_A:
                continue
            if module.use_dora.get(name) or module.fan_in_fan_out or getattr(module, "lora_bias", {}).get(name):
                raise TuneloopError(f"adapter {name!r}: DoRA, LoRA biases and fan-in-fan-out layers are not served")
            start = rows.offsets[name]
            rank = module.r[name]
            a[start : start + rank] = module.lora_A[name].weight
            b[:, start : start + rank] = module.lora_B[name].weight * module.scaling[name]
        parent_path, _, attribute = path.rpartition(".")
        setattr(peft_model.get_submodule(parent_path), attribute, MultiLoraLinear(base, a, b, rows))
    return peft_model.get_base_model(), rows
