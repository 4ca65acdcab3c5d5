"""Collators: padded batches and padding-free packing, carrying per-token weights.

Both take samples from :func:`losslab.masking.build_samples` (``input_ids``, ``labels``,
``weights``; other keys such as ``source`` are ignored) and return tensors whose ``labels``
are NOT shifted (the loss shifts, as in transformers).

Packing puts several samples in one row. Three things keep it equal to running the samples
one by one (tested to float64 precision on SmolLM2):

- ``position_ids`` restart at 0 for every sample;
- attention stays inside each sample: transformers (5.x) turns restarting
  ``position_ids`` with ``attention_mask=None`` AND no KV cache into a block-diagonal causal
  mask for the sdpa, eager and flex paths (``masking_utils.find_packed_sequence_indices``).
  A model whose config has ``use_cache=True`` creates a cache even in training, and then
  silently attends across samples; the batch therefore carries ``use_cache=False``. Flash
  attention gets ``cu_seq_lens_q/k`` and ``max_length_q/k`` (``flash_attn_kwargs=True``);
  a model that supports none of these can be given an explicit 4D additive mask
  (``block_mask_dtype=...``);
- the first token of every sample gets label -100 (weight 0): the last token of the
  previous sample would otherwise learn to predict it across the boundary. Alone, a
  sample's first token is never a target either (the shift drops it), so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from losslab.errors import UserError
from losslab.labels import IGNORE_INDEX

Sample = Mapping[str, Any]


def _weights(sample: Sample) -> list[float]:
    if "weights" in sample and sample["weights"] is not None:
        return list(sample["weights"])
    return [0.0 if label == IGNORE_INDEX else 1.0 for label in sample["labels"]]


def _check(samples: Sequence[Sample]) -> None:
    """``labels`` (and ``weights``) must have one entry per input id: a shorter list would be
    broadcast over the row (or misalign a packed row) without any error from torch."""
    if not samples:
        raise ValueError("empty batch")
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        for key in ("labels", "weights"):
            if key in s and s[key] is not None and len(s[key]) != n:
                src = s.get("source")
                where = (
                    f"{src['file']}:{src['line']}"
                    if isinstance(src, Mapping) and "file" in src
                    else f"sample {i} of the batch"
                )
                raise UserError(f"field {key!r}: {len(s[key])} entries for {n} input_ids", where=where)


class PaddedCollator:
    """Pad a batch to its longest sample (optionally a multiple of ``pad_to_multiple_of``).

    Returns ``input_ids``, ``attention_mask`` (1 on real tokens), ``labels`` (-100 on
    padding) and ``weights`` (0 on padding), each ``(B, T)``.
    """

    def __init__(
        self, pad_token_id: int, *, pad_to_multiple_of: int | None = None, padding_side: str = "right"
    ) -> None:
        if padding_side not in ("right", "left"):
            raise UserError(f"padding_side must be 'right' or 'left'; got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def __call__(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        _check(samples)
        longest = max(len(s["input_ids"]) for s in samples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(samples)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        weights = torch.zeros((batch, longest), dtype=torch.float32)
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            cols = slice(0, n) if self.padding_side == "right" else slice(longest - n, longest)
            input_ids[b, cols] = torch.as_tensor(s["input_ids"], dtype=torch.long)
            labels[b, cols] = torch.as_tensor(s["labels"], dtype=torch.long)
            attention_mask[b, cols] = 1
            weights[b, cols] = torch.as_tensor(_weights(s), dtype=torch.float32)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weights": weights}


class PackedCollator:
    """Concatenate a batch into one row ``(1, N)`` with restarting ``position_ids``.

    Returns ``input_ids``, ``labels`` (first token of each sample -100), ``weights``,
    ``position_ids``, ``use_cache=False`` and, on request, the flash
    attention kwargs or a 4D block-diagonal causal ``attention_mask`` (1, 1, N, N) with 0
    where attention is allowed and the dtype's minimum elsewhere. Without that mask there is
    deliberately no ``attention_mask``: transformers then detects the packing from
    ``position_ids``.
    """

    def __init__(self, *, flash_attn_kwargs: bool = False, block_mask_dtype: torch.dtype | None = None) -> None:
        self.flash_attn_kwargs = flash_attn_kwargs
        self.block_mask_dtype = block_mask_dtype

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        _check(samples)
        ids: list[int] = []
        labels: list[int] = []
        weights: list[float] = []
        positions: list[int] = []
        lens = []
        for s in samples:
            n = len(s["input_ids"])
            if n == 0:
                continue
            w = _weights(s)
            ids.extend(s["input_ids"])
            labels.extend([IGNORE_INDEX, *s["labels"][1:]])  # no prediction across the boundary
            weights.extend([0.0, *w[1:]])
            positions.extend(range(n))
            lens.append(n)
        out: dict[str, Any] = {
            "input_ids": torch.tensor([ids], dtype=torch.long),  # (1, N)
            "labels": torch.tensor([labels], dtype=torch.long),
            "weights": torch.tensor([weights], dtype=torch.float32),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            # transformers only derives the packed mask when no KV cache exists, and a model
            # whose config says use_cache=True builds one even in training
            "use_cache": False,
        }
        if self.flash_attn_kwargs:
            cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(lens), 0)
            longest = max(lens, default=0)
            out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        if self.block_mask_dtype is not None:
            out["attention_mask"] = block_causal_mask(lens, self.block_mask_dtype)
        return out


def block_causal_mask(seq_lens: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask (1, 1, N, N): token q may attend to k iff same sample and k <= q."""
    seg = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.as_tensor(list(seq_lens)))  # (N,)
    n = seg.numel()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal & (seg[:, None] == seg[None, :])
    mask = torch.zeros(n, n, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def pack_greedy(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sample indices into rows of at most ``max_tokens`` tokens (first-fit decreasing)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        if n > max_tokens:
            raise UserError(f"sample {i} has {n} tokens, more than the packing length {max_tokens}; set max_length")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_tokens - n)
    return [sorted(r) for r in rows]
