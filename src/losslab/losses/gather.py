"""Tensors of every process, with the gradient kept: :func:`gather_across_devices`.

Losses whose value for one item depends on other items of the batch (InfoNCE's in-batch
negatives) see more of the batch when each process adds the other processes' rows. Under
``torch.distributed`` with several processes, each process scores its own items against the
rows of all of them; the gradient of a row another process used comes back to the process that
computed it, so the loss summed over processes has the gradient of one process holding the
whole batch. Without a process group (or with one process) everything here is the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist


def process_group_size(group: Any = None) -> int:
    """The number of processes of ``group`` (default: the world); 1 without ``torch.distributed``."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _row_counts(x: torch.Tensor, group: Any) -> list[int]:
    """The number of rows of ``x`` on every process, in rank order."""
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(count) for _ in range(process_group_size(group))]
    dist.all_gather(counts, count, group=group)
    return [int(c.item()) for c in counts]


def _exchange(x: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
    """Every process's ``x`` (``sizes[p]`` rows on process p) concatenated in rank order.

    ``all_gather`` needs one shape everywhere: each ``x`` is padded with zero rows to the largest
    (at least 1, so no process sends an empty tensor) and cut back after the exchange."""
    longest = max(1, *sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """Forward: the rows of every process in rank order. Backward: the output's gradient summed
    over processes (each process's loss reaches every row it used), this process's rows of it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int], start: int, group: Any) -> torch.Tensor:
        ctx.group, ctx.start, ctx.rows = group, start, x.shape[0]
        return _exchange(x.detach(), sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.start : ctx.start + ctx.rows], None, None, None


def gather_across_devices(x: torch.Tensor, *, group: Any = None) -> tuple[torch.Tensor, int]:
    """The rows of ``x`` of every process, and where this process's rows start.

    Shapes: ``x`` (N_p, ...) on process p (N_p may differ between processes); returns
    (sum_p N_p, ...) in rank order and ``start`` = sum of N_q over q < this rank, so
    ``out[start : start + N_p]`` holds this process's ``x`` (its values bit for bit).

    Gradient: the gradient of ``out`` is summed over the processes before this process takes its
    rows, so a loss computed on each process from ``out`` and summed over processes (what DDP's
    gradient averaging does, with the loss scaled by the number of processes) has exactly the
    gradient of one process computing it on the whole batch. Every process must call this (and
    run backward, when ``x`` requires grad) the same number of times in the same order: these
    are collectives. Without ``torch.distributed`` initialised, or with one process: ``(x, 0)``.
    Cost: the output (sum_p N_p, ...) on every process, and in backward one all-reduce of its
    gradient.
    """
    if process_group_size(group) == 1:
        return x, 0
    sizes = _row_counts(x, group)
    start = sum(sizes[: dist.get_rank(group)])
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _exchange(x, sizes, group), start
    # torch leaves Function.apply unannotated (see pyproject's untyped_calls_exclude); typed here
    apply = cast(Callable[..., torch.Tensor], _GatherRows.apply)
    return apply(x, sizes, start, group), start
