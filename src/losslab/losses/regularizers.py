"""Parameter regularisers as losses: L2 (weight decay as a loss) and L2-SP.

Both act on a chosen subset of named parameters, picked with shell-style patterns
(``fnmatch``) on the names of ``model.named_parameters()``: ``include`` (default every
parameter) minus ``exclude`` (e.g. ``["*bias", "*norm*"]``), trainable ones only by default.
A selection that matches nothing is an error (a typo would otherwise silently give 0).

Reduction: ``sum`` (default) adds every selected scalar's term; ``mean`` divides that sum
by the number of selected scalars; ``none`` gives one value per selected tensor, in order.
Parameters of any float dtype are computed in float32 (float64 stays float64).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from losslab.losses.common import compute_dtype
from losslab.losses.reduction import check_reduction, reduce_loss

Parameters = nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def select_parameters(
    params: Parameters,
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    trainable_only: bool = True,
) -> dict[str, torch.Tensor]:
    """The named parameters whose name matches a pattern of ``include`` and none of ``exclude``.

    ``params``: a module (its ``named_parameters()``), a name -> tensor mapping, or pairs.
    ``trainable_only`` skips tensors with ``requires_grad=False`` (e.g. a frozen base model).
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include and exclude are lists of patterns, not single strings")
    named: list[tuple[str, torch.Tensor]]
    if isinstance(params, nn.Module):
        named = list(params.named_parameters())
    elif isinstance(params, Mapping):
        named = list(params.items())
    else:
        named = list(params)
    chosen = {
        name: p
        for name, p in named
        if any(fnmatchcase(name, pat) for pat in include)
        and not any(fnmatchcase(name, pat) for pat in exclude)
        and (p.requires_grad or not trainable_only)
    }
    if not chosen:
        examples = ", ".join(name for name, _ in named[:5]) or "none"
        raise ValueError(
            f"include {list(include)} / exclude {list(exclude)} select no "
            f"{'trainable ' if trainable_only else ''}parameter; names look like: {examples}"
        )
    return chosen


def snapshot_parameters(
    params: Parameters, *, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """Detached copies of the selected parameters: the reference point of :func:`l2_sp_penalty`
    (take it from the pretrained model before training starts)."""
    return {n: p.detach().clone() for n, p in select_parameters(params, include=include, exclude=exclude).items()}


def _reduce(per_tensor: list[torch.Tensor], numel: int, reduction: str) -> torch.Tensor:
    check_reduction(reduction)
    stacked = torch.stack(per_tensor)
    return reduce_loss(stacked, None, reduction, numel)


def l2_penalty(
    params: Parameters,
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    reduction: str = "sum",
) -> torch.Tensor:
    """L2 regularisation: ``0.5 * sum_i theta_i^2`` over the selected parameters.

    With weight ``lambda`` its gradient is ``lambda * theta``: the same step as SGD weight
    decay ``lambda`` (coupled; unlike AdamW's decoupled decay under adaptive optimisers).
    """
    chosen = select_parameters(params, include=include, exclude=exclude)
    per_tensor = [0.5 * p.to(compute_dtype(p)).square().sum() for p in chosen.values()]
    return _reduce(per_tensor, sum(p.numel() for p in chosen.values()), reduction)


def l2_sp_penalty(
    params: Parameters,
    reference: Mapping[str, torch.Tensor],
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    reduction: str = "sum",
) -> torch.Tensor:
    """L2-SP (Li et al. 2018): ``0.5 * sum_i (theta_i - theta0_i)^2``, a pull towards the
    pretrained weights ``reference`` (name -> tensor, e.g. from :func:`snapshot_parameters`).

    Every selected parameter must have a reference of the same shape; the reference gets
    no gradient.
    """
    chosen = select_parameters(params, include=include, exclude=exclude)
    missing = [name for name in chosen if name not in reference]
    if missing:
        raise ValueError(f"no reference weights for {len(missing)} parameter(s), e.g. {missing[:3]}")
    per_tensor = []
    for name, p in chosen.items():
        ref = reference[name]
        if ref.shape != p.shape:
            raise ValueError(f"reference {name} has shape {tuple(ref.shape)}, parameter {tuple(p.shape)}")
        dtype = compute_dtype(p)
        per_tensor.append(0.5 * (p.to(dtype) - ref.detach().to(device=p.device, dtype=dtype)).square().sum())
    return _reduce(per_tensor, sum(p.numel() for p in chosen.values()), reduction)
