"""Shared reference helpers for the loss tests (as fixtures: test modules are not importable)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def expected_reduction(
    per_item: torch.Tensor, mask: torch.Tensor | None, reduction: str, num_items: float | None = None
) -> torch.Tensor:
    """The reduction every catalogue loss promises, written out: zero the masked items, then
    none = as is, sum = total, mean = total / (num_items or the number of unmasked items, >= 1)."""
    if mask is not None:
        per_item = torch.where(torch.broadcast_to(mask, per_item.shape), per_item, torch.zeros_like(per_item))
        count = float(torch.broadcast_to(mask, per_item.shape).sum())
    else:
        count = float(per_item.numel())
    if reduction == "none":
        return per_item
    if reduction == "sum":
        return per_item.sum()
    return per_item.sum() / max(num_items if num_items is not None else count, 1.0)


@pytest.fixture
def reduce_like() -> Callable[..., torch.Tensor]:
    return expected_reduction


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator, so every test draws the same random inputs on every run."""
    return torch.Generator().manual_seed(1234)
