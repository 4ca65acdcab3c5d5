"""Exact reductions shared by every loss: sum, then divide once by an explicit count."""

from __future__ import annotations

import math
from typing import Literal

import torch

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(allowed)}; got {reduction!r}")


def reduce_loss(
    per_item: torch.Tensor,
    mask: torch.Tensor | None,
    reduction: str,
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-item losses that are already zero where ``mask`` is False.

    - ``none``: ``per_item`` unchanged (same shape).
    - ``sum``: the sum over all items.
    - ``mean``: the sum divided by ``num_items`` when given (the global count of trained items
      across micro-batches and processes, for exact gradient accumulation), else by the number
      of True entries of ``mask`` (all items when ``mask`` is None). The count is clamped to at
      least 1, so an all-masked batch gives 0, never NaN; a negative or non-finite
      ``num_items`` is a ``ValueError`` (see :func:`check_count`).
    """
    if reduction == "none":
        return per_item
    total = per_item.sum()
    if reduction == "sum":
        return total
    check_count(num_items)
    if num_items is None:
        num_items = mask.sum() if mask is not None else per_item.numel()
    denom = torch.as_tensor(num_items, dtype=total.dtype, device=total.device)
    return total / denom.clamp(min=1)


def check_count(num_items: int | float | torch.Tensor | None, name: str = "num_items") -> None:
    """``ValueError`` unless ``num_items`` is None or a finite number >= 0: the clamp to 1 would
    silently turn a negative count's ``mean`` into a sum. A tensor is checked only on the CPU:
    reading a count back from an accelerator would make every step wait for it."""
    if num_items is None:
        return
    if isinstance(num_items, torch.Tensor):
        if num_items.device.type != "cpu":
            return
        valid = bool(((num_items >= 0) & torch.isfinite(num_items)).all())
    else:
        valid = math.isfinite(num_items) and num_items >= 0
    if not valid:
        raise ValueError(f"{name} must be a finite number >= 0; got {num_items}")
