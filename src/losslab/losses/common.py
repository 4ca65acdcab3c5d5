"""Helpers shared by the catalogue losses: compute dtype, masks, weights and option checks."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, NamedTuple

import torch
from annotated_types import Ge, Gt, Interval

from losslab.losses.reduction import check_reduction, reduce_loss

Count = int | float | torch.Tensor | None
# Option types: the bounds are read by the registry to reject a bad config value up front.
NonNegative = Annotated[float, Ge(0)]
Positive = Annotated[float, Gt(0)]
Probability = Annotated[float, Interval(ge=0, le=1)]
ClassValues = Sequence[NonNegative] | torch.Tensor | None


class TeacherTopK(NamedTuple):
    """A teacher's top-k next-token logits at each position, as cached for distillation:
    ``logits`` (..., k) the teacher's raw logits (before temperature) at ``indices`` (..., k), the
    vocabulary ids, in descending order of logit."""

    logits: torch.Tensor
    indices: torch.Tensor


def compute_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype a loss is computed in, for a tensor or a dtype: float64 stays float64; every
    other dtype (bfloat16, float16, float32) computes in float32."""
    dtype = x.dtype if isinstance(x, torch.Tensor) else x
    return torch.float64 if dtype == torch.float64 else torch.float32


def finish(
    per_item: torch.Tensor,
    mask: torch.Tensor | None,
    reduction: str,
    num_items: Count = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight ``per_item``, set masked-out items to exactly 0, then :func:`reduce_loss`.

    ``mask`` and ``weights`` have ``per_item``'s shape or its leading dims (``(N,)`` against
    ``(N, K)`` items), see :func:`per_example`.
    ``torch.where`` (not a product) drops masked items and their weights. That keeps a NaN
    computed for a padded item out of the loss, but not out of the gradients (where's
    backward sends 0, times the item's NaN derivative): losses also zero their inputs at
    masked items BEFORE computing, with :func:`masked`. ``mean`` divides by ``num_items``
    when given, else by the number of unmasked items: weights scale the numerator only.
    """
    check_reduction(reduction)
    if mask is not None:
        mask = per_example(mask.to(torch.bool), per_item)
    if weights is not None:
        per_item = per_item * masked(per_example(weights.to(per_item.dtype), per_item), mask)
    return reduce_loss(masked(per_item, mask), mask, reduction, num_items)


def masked(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``values`` with 0 wherever ``mask`` is False (``mask`` of ``values``' shape or its leading
    dims, see :func:`per_example`; None keeps everything). A loss computed from this has finite
    gradients even when a masked item holds NaN or inf."""
    if mask is None:
        return values
    keep = per_example(mask.to(torch.bool), values)
    return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))


def per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` broadcast to ``like``'s shape, aligned on the LEADING dims: a per-example
    ``(N,)`` mask or weight spreads over the labels of ``(N, K)`` items."""
    if values.ndim < like.ndim and values.shape == like.shape[: values.ndim]:
        values = values.reshape(values.shape + (1,) * (like.ndim - values.ndim))
    return torch.broadcast_to(values, like.shape)


def class_vector(
    values: torch.Tensor | Sequence[float] | float | None, like: torch.Tensor, name: str
) -> torch.Tensor | None:
    """``values`` as a float tensor on ``like``'s device and dtype: per-class weights ``(C,)``
    from a list or tensor, or a scalar; None stays None."""
    if values is None:
        return None
    vector = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if vector.ndim > 1:
        raise ValueError(f"{name} must be a number or a list of per-class numbers; got shape {tuple(vector.shape)}")
    if vector.ndim == 1 and vector.shape[0] != like.shape[-1]:
        raise ValueError(f"{name} has {vector.shape[0]} entries but there are {like.shape[-1]} classes")
    return vector


def split_targets(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, safe_targets)``: where targets are trained, and targets with ignored ones set to 0."""
    if targets.dtype.is_floating_point:
        raise ValueError(f"class targets must be integer class indices; got dtype {targets.dtype}")
    mask = targets != ignore_index
    return mask, torch.where(mask, targets, torch.zeros_like(targets))


def check_range(name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """``TypeError`` unless ``value`` is a number, ``ValueError`` unless it is finite and
    ``low <= value <= high`` (each bound optional, inclusive)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {value!r}")
    if not math.isfinite(value):  # NaN passes every comparison below
        raise ValueError(f"{name} must be a finite number; got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = [f">= {low}"] * (low is not None) + [f"<= {high}"] * (high is not None)
        raise ValueError(f"{name} must be {' and '.join(bounds)}; got {value}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes must match: " + ", ".join(f"{n} {s}" for n, s in shapes.items()))


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def config_value(value: Any) -> Any:
    """A config value with exponent-only floats read as numbers: YAML 1.1 (PyYAML) loads
    ``1e-3`` (no dot) as the STRING ``'1e-3'``; every other value is returned unchanged."""
    if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value
