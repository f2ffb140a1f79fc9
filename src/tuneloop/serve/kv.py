"""Key/value caches of the running requests, one slot per request, and the attention over them.

A decode step runs every token of the step — one per decoding request, a chunk of prompt per request
being prefilled — as one batch of length-1 rows, shape (N, 1). Everything but attention is per token, so
no compute goes to padding and each row can carry its own LoRA adapter. Attention, registered below as an
attention implementation, writes the step's keys and values into the requests' slots and attends each
query to its own request's cache only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION = "tuneloop_slots"  # attention implementation name registered by `register_attention`


@dataclass
class Prefill:
    slot: int
    start: int  # position of the chunk's first token (tokens before it are in the slot already)
    rows: slice  # the chunk's rows in the step


@dataclass
class StepPlan:
    """Where each row of one forward pass goes: `slots`/`positions` (N,) per row; `decode_slots` the slots
    whose request decodes one token this step (row `decode_rows[i]`); `prefills` the prompt chunks."""

    cache: SlotCache
    slots: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    decode_rows: torch.Tensor  # (B,)
    decode_slots: list[int]
    prefills: list[Prefill]
    lengths: torch.Tensor  # (S,) tokens in each slot once this step's tokens are written


class SlotCache:
    """Keys and values of up to `slots` requests for every layer: (slots, kv_heads, capacity, head_dim),
    grown on demand. A finished request's slot is refilled by moving the last used slot into it, so the
    used slots are always 0..used-1 and decode attention reads them as one view, without a gather."""

    def __init__(self, config, slots: int, dtype: torch.dtype, device: torch.device):
        self.layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.slots, self.dtype, self.device = slots, dtype, device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = [0] * slots

    def reserve(self, length: int) -> None:
        """Make room for `length` tokens per slot (capacity doubles, so growth is rare)."""
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity, 256)
        shape = (self.slots, self.kv_heads, capacity, self.head_dim)
        grown_keys, grown_values = [], []
        for layer in range(self.layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.capacity:
                k[:, :, : self.capacity] = self.keys[layer]
                v[:, :, : self.capacity] = self.values[layer]
            grown_keys.append(k)
            grown_values.append(v)
        self.keys, self.values, self.capacity = grown_keys, grown_values, capacity

    def move(self, source: int, target: int) -> None:
        """Copy slot `source`'s tokens into slot `target`."""
        n = self.lengths[source]
        for layer in range(self.layers):
            self.keys[layer][target, :, :n] = self.keys[layer][source, :, :n]
            self.values[layer][target, :, :n] = self.values[layer][source, :, :n]
        self.lengths[target] = n

    def copy_in(self, slot: int, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fill the start of `slot` with a cached prefix: per layer (kv_heads, P, head_dim) keys and values."""
        length = prefix[0][0].shape[1]
        self.reserve(length)
        for layer, (k, v) in enumerate(prefix):
            self.keys[layer][slot, :, :length] = k
            self.values[layer][slot, :, :length] = v
        self.lengths[slot] = length

    def copy_out(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `length` tokens of `slot`, per layer, as tensors of their own."""
        return [
            (self.keys[layer][slot, :, :length].clone(), self.values[layer][slot, :, :length].clone())
            for layer in range(self.layers)
        ]


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, step: StepPlan | None = None, **kwargs):
    """query (N, H, 1, D), key/value (N, KV, 1, D), one row per token of the step -> (N, 1, H, D)."""
    if step is None:
        raise RuntimeError(f"the {ATTENTION} attention runs inside the serving engine's steps only")
    cache, layer = step.cache, module.layer_idx
    keys, values = cache.keys[layer], cache.values[layer]  # (S, KV, T, D)
    keys[step.slots, :, step.positions] = key[:, :, 0]
    values[step.slots, :, step.positions] = value[:, :, 0]
    heads = query.shape[1]
    out = query.new_empty(query.shape[0], 1, heads, query.shape[3])

    if step.decode_slots:
        # One query per request against its own slot, written out as matmuls: on CPU in bfloat16 this is
        # several times faster than SDPA's kernel for single-token queries, and as fast in float32.
        used = max(step.decode_slots) + 1
        longest = int(step.lengths[:used].max())
        kv_heads, dim = keys.shape[1], query.shape[3]
        q = query.new_zeros(used, heads, 1, dim)  # rows of slots that do not decode stay unused
        q[step.decode_slots] = query[step.decode_rows]
        q = q.view(used, kv_heads, heads // kv_heads, dim)  # (used, KV, G, D): a key/value head's query group
        scores = (q @ keys[:used, :, :longest].transpose(2, 3)).float() * scaling  # (used, KV, G, T)
        hidden = torch.arange(longest, device=query.device) >= step.lengths[:used, None]  # (used, T)
        weights = scores.masked_fill_(hidden[:, None, None, :], float("-inf")).softmax(-1).to(values.dtype)
        attended = (weights @ values[:used, :, :longest]).view(used, heads, 1, dim)
        out[step.decode_rows] = attended[step.decode_slots].transpose(1, 2)

    for chunk in step.prefills:
        q = query[chunk.rows].transpose(0, 2)  # (1, H, n, D)
        n, end = q.shape[2], chunk.start + q.shape[2]
        causal = torch.arange(end, device=query.device)[None, :] <= torch.arange(chunk.start, end, device=query.device)[:, None]
        attended = F.scaled_dot_product_attention(
            q, keys[chunk.slot : chunk.slot + 1, :, :end], values[chunk.slot : chunk.slot + 1, :, :end],
            attn_mask=causal[None, None], scale=scaling, enable_gqa=heads != keys.shape[1],
        )  # (1, H, n, D)
        out[chunk.rows] = attended.permute(2, 0, 1, 3)
    return out, None


def register_attention() -> None:
    """Make `ATTENTION` a valid `attn_implementation`. It registers no mask function: transformers then
    builds no mask, and `slot_attention` masks by itself."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, slot_attention)
