"""A cache of per-item tensors computed once, in checksummed shards written atomically.

The storage layer of the preference reference cache (:mod:`losslab.train.reference`) and the
distillation teacher cache (:mod:`losslab.train.teacher_cache`): each says what it stores
(the tensors of a shard, how they are checked, which header fields name the layout); this module
lays the items out in shards, reads the complete ones, computes the missing ones (shared out
between the ranks of ``torch.distributed``), writes them atomically and writes the manifest.

An entry (one fingerprint, 32 hex digits)::

    ROOT/FINGERPRINT/
      shard-000000000-000001024.safetensors   items [0, 1024): the kind's tensors, and metadata:
      ...                                     format, fingerprint, start, stop, the kind's
                                              header fields, sha256 of the tensors' bytes
      manifest.json                           written last, once every shard is there

A shard holds a whole number of batches and is written atomically (a temp file renamed into
place). It is trusted only when it parses, its metadata equals what this layout expects, the
checksum of its tensors matches and the kind's ``check`` accepts their dtypes and shapes;
anything else (truncated, corrupt, another layout) is recomputed, never half-read. A killed
precompute therefore resumes from its complete shards. Under ``torch.distributed`` each rank
computes shard ``i`` of the missing ones when ``i % world_size == rank``, all ranks meet at a
barrier, then every rank reads every shard (one its file system cannot see is computed locally).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from losslab.files import write_atomic
from losslab.masking.parallel import prune

FINGERPRINT = re.compile(r"[0-9a-f]{32}")
_TEMP_MAX_AGE = 3600.0  # a write's temp file older than this is a killed write's leftover

Tensors = dict[str, torch.Tensor]
ComputeShard = Callable[[int, int, Callable[[int], Any]], Tensors]
"""``(start, stop, advance) -> tensors`` of items [start, stop); ``advance(1)`` after each batch."""
CheckShard = Callable[[Tensors, int, int], bool]
"""``(tensors, start, stop) -> ok``: the tensors read back have the dtypes and shapes expected."""


@dataclass(frozen=True)
class ShardLayout:
    """What one kind of cache writes: ``format`` (its encoding version), ``header`` (the layout
    fields besides fingerprint and item range, all strings: a shard with other values is not
    read), ``shard_items`` (items per shard), ``manifest`` (extra fields of manifest.json)."""

    format: str
    header: Mapping[str, str]
    shard_items: int
    manifest: Mapping[str, Any]


def cached_shards(
    n: int,
    compute: ComputeShard,
    check: CheckShard,
    *,
    root: Path,
    fingerprint: str,
    layout: ShardLayout,
    batches_of: Callable[[int, int], int],
    progress: bool,
    desc: str,
) -> list[Tensors]:
    """The tensors of every shard of ``n`` items, in order: read where complete and valid,
    else computed by ``compute`` and written. ``batches_of(start, stop)``: the batches a shard
    takes (for the progress bar, rank 0 only)."""
    from tqdm import tqdm

    if not FINGERPRINT.fullmatch(fingerprint):
        raise ValueError(f"fingerprint must be 32 lowercase hex digits; got {fingerprint!r}")
    entry = root / fingerprint
    entry.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.utime(entry)  # used now: a prune by another process keeps it
    ranges = [(a, min(a + layout.shard_items, n)) for a in range(0, n, layout.shard_items)]

    def read(i: int) -> Tensors | None:
        a, b = ranges[i]
        return read_shard(entry / shard_name(a, b), header(fingerprint, a, b, layout), lambda t: check(t, a, b))

    def make(i: int, advance: Callable[[int], Any]) -> Tensors:
        a, b = ranges[i]
        tensors = compute(a, b, advance)
        write_shard(entry / shard_name(a, b), tensors, header(fingerprint, a, b, layout))
        return tensors

    shards: list[Tensors | None] = [read(i) for i in range(len(ranges))]
    missing = [i for i, s in enumerate(shards) if s is None]
    rank, world = rank_and_world()
    mine = missing[rank::world]
    total = sum(batches_of(*ranges[i]) for i in mine)
    with tqdm(total=total, desc=desc, unit="batch", disable=not progress or rank != 0 or not total) as bar:
        for i in mine:
            shards[i] = make(i, bar.update)
        if world > 1:
            torch.distributed.barrier()  # every rank has written its share
            for i in missing:
                if shards[i] is None:  # another rank's (or computed here if this rank cannot see it)
                    shards[i] = read(i) or make(i, bar.update)
    if rank == 0:
        write_manifest(entry, n, layout, fingerprint, [shard_name(a, b) for a, b in ranges])
    if missing:
        clean_temporaries(entry)
        with contextlib.suppress(OSError):
            prune(root, keep=entry)
    done = [s for s in shards if s is not None]
    assert len(done) == len(shards)
    return done


def rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


def batch_count(start: int, stop: int, batch_size: int) -> int:
    return math.ceil((stop - start) / batch_size)


def shard_name(start: int, stop: int) -> str:
    return f"shard-{start:09d}-{stop:09d}.safetensors"


def header(fingerprint: str, start: int, stop: int, layout: ShardLayout) -> dict[str, str]:
    """The metadata a shard of items ``start:stop`` is written with and must match when read."""
    return {
        "format": layout.format,
        "fingerprint": fingerprint,
        "start": str(start),
        "stop": str(stop),
        **layout.header,
    }


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensors' bytes, in name order (one tensor: the sha256 of its bytes)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_shard(path: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, str]) -> None:
    from safetensors.torch import save

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomic(path, save(cpu, metadata={**expected, "sha256": digest(cpu)}))


def read_shard(path: Path, expected: Mapping[str, str], check: Callable[[Tensors], bool]) -> Tensors | None:
    """The shard's tensors if it parses, its metadata has ``expected``, its checksum matches and
    ``check`` accepts them; else None (recomputed by the caller, never half-read)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size])["__metadata__"]
        tensors = load(data)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):  # missing, truncated, not ours
        return None
    if not isinstance(meta, dict) or any(meta.get(key) != value for key, value in expected.items()):
        return None
    try:
        if not check(tensors) or meta.get("sha256") != digest(tensors):
            return None
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None
    return tensors


def write_manifest(entry: Path, n: int, layout: ShardLayout, fingerprint: str, shards: list[str]) -> None:
    """``manifest.json`` (after every shard is written): rewritten only when it says something else."""
    manifest = {
        "format": int(layout.format) if layout.format.isdigit() else layout.format,
        "fingerprint": fingerprint,
        "items": n,
        **layout.manifest,
        "shard_items": layout.shard_items,
        "shards": shards,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    path = entry / "manifest.json"
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            return
    write_atomic(path, text)


def read_manifest(entry: Path) -> dict[str, Any] | None:
    """An entry's ``manifest.json`` (None when absent or unreadable): what a complete entry holds."""
    try:
        value = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def clean_temporaries(entry: Path) -> None:
    """Delete the temp files of writes killed long ago (``.NAME.*``, see write_atomic)."""
    now = time.time()
    for leftover in entry.glob(".*"):
        with contextlib.suppress(OSError):
            if leftover.is_file() and now - leftover.stat().st_mtime > _TEMP_MAX_AGE:
                leftover.unlink()
