"""The distillation teacher's top-k next-token logits: the one top-k step, and its offline cache.

:func:`item_topk` runs the teacher on ONE sample (no padding, no other sample in the batch) and
keeps, at each trained position, its ``k`` largest logits (float32, before temperature,
descending) and their token ids. The ``distill`` task calls it live at every step and the cache
calls it once per sample, so both give bit-identical values whatever batch a sample lands in.

:func:`cached_teacher_topk` stores them under ``$LOSSLAB_CACHE/teacher`` (:func:`teacher_cache_root`),
one entry per :func:`teacher_fingerprint` (the teacher's weight and config files, the encoded
samples, template and mask settings, ``top_k``, the code that computes them), in the checksummed,
atomically written, resumable shards of :mod:`losslab.train.shard_cache`. A shard holds, for
its samples in order, ``logits`` float32 (R, k), ``indices`` int32 (R, k) and ``offsets`` int64
(n + 1,): sample ``i``'s rows are ``offsets[i]:offsets[i + 1]``, one per trained position.
Size on disk: 8 bytes x k per trained token (k = 20: 160 B; 100,000 trained tokens: 16 MB).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from losslab.labels import IGNORE_INDEX
from losslab.losses.common import TeacherTopK
from losslab.paths import cache_dir
from losslab.train.shard_cache import ShardLayout, batch_count, cached_shards

ENCODING_VERSION = 1
"""Bump when what a fingerprint covers, or how the cached values are laid out, changes."""
SHARD_ITEMS = 512
FINGERPRINT_CODE = ("losslab.train.teacher_cache",)
"""The modules whose code computes the cached values: a change to one recomputes the cache."""


def teacher_cache_root() -> Path:
    """Where teacher top-k entries live: ``$LOSSLAB_CACHE/teacher``."""
    return cache_dir() / "teacher"


def trained_positions(labels: Sequence[int]) -> list[int]:
    """Positions ``t`` of a sample whose prediction is trained: ``labels[t + 1] != -100``."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]


@torch.no_grad()
def item_topk(
    teacher: torch.nn.Module,
    input_ids: Sequence[int] | torch.Tensor,
    positions: Sequence[int] | torch.Tensor,
    k: int,
) -> TeacherTopK:
    """The teacher's top-``k`` logits of one sample at ``positions``: (R, k) float32 and int64.

    The sample runs alone, as a (1, n) batch without attention mask, in the teacher's dtype and
    without autocast; the model's own head gives the logits at ``positions`` only
    (``logits_to_keep``), so no n x V tensor is held."""
    device = next(teacher.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)  # (1, n)
    keep = torch.as_tensor(list(positions), dtype=torch.long, device=device)  # (R,)
    if keep.numel() == 0:
        empty = torch.zeros(0, k, device=device)
        return TeacherTopK(empty, empty.long())
    with torch.autocast(device.type, enabled=False):
        logits = teacher(input_ids=ids, logits_to_keep=keep, use_cache=False).logits[0]  # (R, V)
    values, indices = logits.float().topk(k, dim=-1)  # (R, k) each, descending
    return TeacherTopK(values, indices)


def teacher_fingerprint(
    teacher: str,
    items: Sequence[Mapping[str, Any]],
    *,
    top_k: int,
    extra: Mapping[str, Any],
    cache_root: Path | None = None,
) -> str:
    """The 32-hex-digit key of the teacher's top-k for ``items`` (their ``input_ids`` and
    ``labels``): :func:`losslab.train.reference.reference_fingerprint` of the teacher, the items,
    ``top_k`` and ``extra`` (dtype, template, mask settings)."""
    from losslab.train.reference import reference_fingerprint

    return reference_fingerprint(
        teacher,
        items,
        fields=("input_ids", "labels"),
        extra={"kind": "teacher top-k", "format": ENCODING_VERSION, "top_k": top_k, **extra},
        code=FINGERPRINT_CODE,
        cache_root=cache_root,
    )


def cached_teacher_topk(
    items: Sequence[Mapping[str, Any]],
    compute: Callable[[Mapping[str, Any]], TeacherTopK],
    *,
    fingerprint: str,
    top_k: int,
    cache_root: Path | None = None,
    progress: bool = True,
    shard_items: int = SHARD_ITEMS,
) -> list[TeacherTopK]:
    """Every item's teacher top-k (R_i, k) on the CPU (logits float32, indices int64), from the
    cache or computed by ``compute(item)`` (:func:`item_topk` on a loaded teacher) and cached.

    ``compute`` is called only for shards that are missing or invalid (so the teacher need only
    be loaded then); its rows must be one per :func:`trained_positions` of the item."""
    if top_k < 1 or shard_items < 1:
        raise ValueError(f"top_k and shard_items must be >= 1; got {top_k}, {shard_items}")
    rows = [len(trained_positions(item["labels"])) for item in items]
    layout = ShardLayout(
        format=f"teacher-topk-{ENCODING_VERSION}",
        header={"top_k": str(top_k)},
        shard_items=shard_items,
        manifest={"top_k": top_k, "rows": sum(rows)},
    )

    def compute_shard(start: int, stop: int, advance: Callable[[int], Any]) -> dict[str, torch.Tensor]:
        logits, indices, offsets = [], [], [0]
        for i in range(start, stop):
            got = compute(items[i])
            values, ids = got.logits.detach().cpu(), got.indices.detach().cpu()
            if tuple(values.shape) != (rows[i], top_k) or values.shape != ids.shape:
                raise ValueError(
                    f"item {i}: expected ({rows[i]}, {top_k}) top-k logits and ids; got {tuple(values.shape)}"
                )
            if torch.isnan(values).any():
                raise ValueError(f"the teacher gave NaN logits for item {i} (not cached)")
            logits.append(values.float())
            indices.append(ids.to(torch.int32))
            offsets.append(offsets[-1] + rows[i])
            advance(1)
        return {
            "logits": torch.cat(logits) if logits else torch.zeros(0, top_k),
            "indices": torch.cat(indices) if indices else torch.zeros(0, top_k, dtype=torch.int32),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        }

    def check(tensors: dict[str, torch.Tensor], start: int, stop: int) -> bool:
        offsets, logits, indices = tensors["offsets"], tensors["logits"], tensors["indices"]
        expected = torch.tensor([0, *rows[start:stop]], dtype=torch.int64).cumsum(0)
        return (
            offsets.dtype == torch.int64
            and torch.equal(offsets, expected)
            and logits.dtype == torch.float32
            and indices.dtype == torch.int32
            and tuple(logits.shape) == tuple(indices.shape) == (int(expected[-1]), top_k)
        )

    shards = cached_shards(
        len(items),
        compute_shard,
        check,
        root=cache_root if cache_root is not None else teacher_cache_root(),
        fingerprint=fingerprint,
        layout=layout,
        batches_of=lambda a, b: batch_count(a, b, 1),
        progress=progress,
        desc="teacher top-k",
    )
    out: list[TeacherTopK] = []
    for shard in shards:
        offsets = shard["offsets"].tolist()
        for a, b in itertools.pairwise(offsets):
            out.append(TeacherTopK(shard["logits"][a:b], shard["indices"][a:b].long()))
    return out
