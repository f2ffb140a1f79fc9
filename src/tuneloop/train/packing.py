"""Padding-free batches: the examples of a batch are concatenated into one row, positions restart at
every example, and attention stays inside each example. No compute is spent on padding, and the loss
only needs the model's output at the positions that are trained."""

from __future__ import annotations

from contextlib import nullcontext
from itertools import accumulate

from tuneloop.train.template import IGNORE

ATTENTION = "tuneloop_varlen"  # attention implementation name registered below
# On a CPU the flash kernel runs fp32 examples shorter than this many tokens about twice as fast as bf16
# ones (forward and backward), and longer ones slower; under autocast it would be handed bf16.
CPU_FP32_ATTENTION_BELOW = 448


def pack(examples: list[dict]) -> dict:
    """Collate tokenized examples (`input_ids`, `labels`) into one packed row:
    input_ids/position_ids (1, T), shift_labels (1, T) — the next token each position must predict, IGNORE
    where nothing is trained and at every example's last token — and cu_seq_lens_q, the example bounds."""
    import torch

    input_ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        input_ids += ids
        positions += range(len(ids))
        targets += labels[1:] + [IGNORE]  # never predict across the border into the next example
    bounds = [0, *accumulate(len(e["input_ids"]) for e in examples)]
    shift_labels = torch.tensor([targets])
    return {
        "input_ids": torch.tensor([input_ids]),
        "position_ids": torch.tensor([positions]),
        "shift_labels": shift_labels,
        "labels": shift_labels,  # the trainer looks for `labels` to know a batch can be scored
        "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32),
    }


def split_rows(batch: dict, max_tokens: int) -> list[dict]:
    """A packed batch cut, at example borders, into rows of at most `max_tokens` tokens (an example longer
    than that is a row of its own). The rows of one step are run one after another and their gradients
    summed, so memory follows the row length, not the batch's total length."""
    bounds = batch["cu_seq_lens_q"].tolist()
    cuts = [0]
    for previous, end in zip(bounds[:-1], bounds[1:]):
        if end - cuts[-1] > max_tokens and previous > cuts[-1]:
            cuts.append(previous)  # this example would overflow the row: it starts the next one
    cuts.append(bounds[-1])
    if len(cuts) == 2:
        return [batch]
    rows = []
    for row_start, row_end in zip(cuts[:-1], cuts[1:]):
        inner = [b - row_start for b in bounds if row_start <= b <= row_end]
        rows.append(
            {
                **{k: batch[k][:, row_start:row_end] for k in ("input_ids", "position_ids", "shift_labels", "labels")},
                "cu_seq_lens_q": batch["cu_seq_lens_q"].new_tensor(inner),
            }
        )
    return rows


def pad_row(batch: dict, multiple: int) -> dict:
    """A packed row lengthened to a multiple of `multiple` tokens by a filler example that attends only to
    itself and is never trained. CPU matmul kernels are built and cached per input shape; with row lengths
    from a few dozen values instead of every length up to the longest, that cache stays small."""
    import torch

    length = batch["input_ids"].shape[1]
    extra = -length % multiple
    if not extra:
        return batch
    device = batch["input_ids"].device
    ignore = torch.full((1, extra), IGNORE, dtype=batch["shift_labels"].dtype, device=device)
    return {
        **batch,
        "input_ids": torch.cat([batch["input_ids"], torch.zeros_like(ignore, dtype=batch["input_ids"].dtype)], 1),
        "position_ids": torch.cat([batch["position_ids"], torch.arange(extra, device=device).unsqueeze(0)], 1),
        "shift_labels": torch.cat([batch["shift_labels"], ignore], 1),
        "labels": torch.cat([batch["labels"], ignore], 1),
        "cu_seq_lens_q": torch.cat([batch["cu_seq_lens_q"], batch["cu_seq_lens_q"].new_tensor([length + extra])]),
    }


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None, **kwargs):
    """Causal attention run separately on each packed example (query/key/value: (1, H, T, D)), so the cost
    is the sum of the examples' squares, not the square of their sum. Without bounds it is plain SDPA."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    dropout = dropout if module.training else 0.0
    cpu_bf16 = query.device.type == "cpu" and (query.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu"))
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        fp32 = cpu_bf16 and end - start < CPU_FP32_ATTENTION_BELOW
        with torch.autocast("cpu", enabled=False) if fp32 else nullcontext():
            attended = F.scaled_dot_product_attention(
                *((q.float(), k.float(), v.float()) if fp32 else (q, k, v)),
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=query.shape[1] != key.shape[1],  # no repeated key/value copies; flash kernel on CPU too
            )
        parts.append(attended.to(query.dtype))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None  # (1, T, H, D)


def register_attention() -> None:
    """Make `ATTENTION` a valid `attn_implementation`. Its mask is SDPA's: unused on packed batches,
    the usual one everywhere else."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, varlen_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
