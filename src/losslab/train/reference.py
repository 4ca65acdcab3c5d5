"""The reference model of preference training: its log-probs on the fly, or computed once and cached.

Preference losses (DPO and its family, KTO) compare the policy's log-probs with those of a frozen
reference model on the same completions. Two ways to get them:

- **on the fly** (``preference.reference: model``): :func:`frozen_reference` gives a frozen copy
  (eval mode, ``requires_grad`` off) that the task runs under ``torch.no_grad()`` at every step;
- **cached** (``preference.reference: cache``): :func:`cached_logps` runs the reference once over
  the encoded items before training and keeps the values on disk, keyed by
  :func:`reference_fingerprint`; later runs with the same inputs read them back.

Both give the same float32 values for the same batches (bit-equal: the cache stores exactly what
``compute`` returned).

The cache (``$LOSSLAB_CACHE/reference``, see :func:`losslab.paths.reference_cache`)::

    reference/
      FINGERPRINT/                       one entry per fingerprint (32 hex digits)
        shard-000000000-000001024.safetensors   items [0, 1024): a float32 tensor "logps" (n, K)
        shard-000001024-000001500.safetensors   and metadata: fingerprint, start, stop, columns,
        ...                                     batch_size, sha256 of the tensor's bytes
        manifest.json                    written last, once every shard is there: what the entry holds
      hashes/                            sha256 of model files, keyed by path, size and mtime

A shard holds a whole number of batches (``shard_items``, a multiple of ``batch_size``) and is
written atomically (:func:`losslab.files.write_atomic`: a temp file renamed into place). It is
trusted only when it parses, its metadata names the same fingerprint, item range, columns and
batch size, its tensor has the expected shape and dtype and its checksum matches; anything else
(truncated, corrupt, another layout) is recomputed, never half-read. A killed precompute
therefore resumes from its complete shards. The manifest is informative (it says an entry is
complete); every read still checks every shard. Entries not used for 30 days are deleted when a
new shard is written (:func:`losslab.masking.parallel.prune`).

Several processes:

- independent processes on the same cache (two runs at once) each compute what they find missing;
  both write the same shards atomically, so the cache stays valid whoever wins.
- under ``torch.distributed`` (torchrun), each rank computes its share of the missing shards
  (round robin: shard ``i`` goes to rank ``i % world_size``), all ranks meet at a barrier, then
  every rank reads every shard; a shard another rank's copy cannot see (a cache folder that is
  not shared between nodes) is computed locally. ``compute`` must therefore run the reference
  on this process alone: no collectives (a reference wrapped in DDP/FSDP would deadlock, as the
  ranks run different numbers of batches).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import math
from array import array
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from losslab.errors import UserError
from losslab.files import hash_file, write_atomic
from losslab.masking.parallel import source_digest
from losslab.models import load_causal_lm, resolve
from losslab.paths import reference_cache
from losslab.train.shard_cache import FINGERPRINT, ShardLayout, batch_count, cached_shards, read_manifest

__all__ = ["cached_logps", "frozen_reference", "read_manifest", "reference_fingerprint"]

ENCODING_VERSION = 1
"""Bump when what a fingerprint covers, or how the cached values are laid out, changes."""

SHARD_TARGET = 1024
"""Items per shard by default (rounded up to a whole number of batches)."""

# the files of a model directory that decide its outputs (tokenizer files do not: items are ids)
MODEL_SUFFIXES = (".safetensors", ".gguf")
MODEL_CONFIGS = ("config.json", "adapter_config.json")

_TENSOR = "logps"

Compute = Callable[[list[Mapping[str, Any]]], torch.Tensor]


# ---- the fingerprint ------------------------------------------------------------------------------


def reference_fingerprint(
    model: str,
    items: Sequence[Mapping[str, Any]],
    *,
    extra: Mapping[str, Any],
    fields: Sequence[str] | None = None,
    revision: str | None = None,
    code: Sequence[str] = (),
    cache_root: Path | None = None,
) -> str:
    """A 32-hex-digit hash of everything the reference log-probs of ``items`` depend on.

    - ``model``: the reference model's name (``builtin:...``, a directory or a hub id), through
      :func:`model_identity`: the sha256 of its weight and config files, or for a hub id not on
      disk its name, ``revision`` and the commit cached locally (if any).
    - ``items``: the encoded items in dataset order (their token-id lists already reflect the
      data, the chat template, the mask settings and ``max_length``); ``fields`` limits which keys
      count (default: every key of each item). Values are lists of ints (hashed as int64), tensors
      (dtype, shape, bytes) or anything JSON can write.
    - ``extra``: the settings that change the values and are not in the items (dtype, attention
      implementation, ...); JSON-able.
    - ``code``: modules (or packages: all their files) whose source computes the values, so that a
      fix in a development install recomputes.
    - :data:`ENCODING_VERSION` and losslab's version.

    ``cache_root``: where file hashes are remembered (default :func:`losslab.paths.reference_cache`).
    """
    from losslab import __version__

    h = hashlib.sha256()

    def add(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little") + data)

    def add_json(part: Any) -> None:
        add(json.dumps(part, sort_keys=True, separators=(",", ":"), default=_jsonable).encode())

    add_json(["losslab reference", ENCODING_VERSION, __version__])
    add_json(model_identity(model, revision=revision, cache_root=cache_root))
    add_json(dict(extra))
    add_json([[name, _module_digest(name)] for name in code])
    add_json(len(items))
    for i, item in enumerate(items):
        keys = sorted(item) if fields is None else list(fields)
        add_json(keys)
        for key in keys:
            if key not in item:
                raise ValueError(f"item {i} has no field {key!r}")
            _add_value(add, add_json, item[key])
    return h.hexdigest()[:32]


def _add_value(add: Callable[[bytes], None], add_json: Callable[[Any], None], value: Any) -> None:
    """One item field: int lists as int64 bytes (fast), tensors by dtype, shape and bytes, the rest
    as JSON; each with a tag so no two kinds of value hash alike."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        add_json(["tensor", str(t.dtype), list(t.shape)])
        add(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return
    if isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
        try:
            add(b"ints" + array("q", value).tobytes())
            return
        except OverflowError:
            pass  # beyond int64: JSON below
    add(b"json")
    add_json(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (torch.dtype, Path)):
        return str(value)
    raise TypeError(f"cannot hash a {type(value).__name__} in a reference fingerprint")


def model_identity(model: str, *, revision: str | None = None, cache_root: Path | None = None) -> dict[str, Any]:
    """What identifies a reference model's weights: for a builtin or a local directory the sha256
    of each weight file (``*.safetensors``, ``*.gguf``), each ``*.index.json`` and its
    ``config.json``/``adapter_config.json``; for a hub id not on disk its name, ``revision`` and
    the commit the local hub cache points at (``None`` before the first download)."""
    where = resolve(model)
    path = Path(where)
    if not path.is_dir():
        return {"hub": model, "revision": revision, "commit": _hub_commit(model, revision)}
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file()
        and (p.name.endswith(MODEL_SUFFIXES) or p.name.endswith(".index.json") or p.name in MODEL_CONFIGS)
    )
    if not any(p.name.endswith(MODEL_SUFFIXES) for p in files):
        raise UserError(f"reference model {model!r}: no weights (*.safetensors) in {path}")
    root = cache_root if cache_root is not None else reference_cache()
    return {"files": {p.name: file_sha256(p, cache_root=root) for p in files}}


def _hub_commit(name: str, revision: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except (ImportError, ValueError, OSError):  # no hub library, not a valid repo id: nothing pins it
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def file_sha256(path: Path, *, cache_root: Path | None = None) -> str:
    """The sha256 of a file's bytes, remembered (in this process and under ``cache_root/hashes``)
    by its absolute path, size and modification time in nanoseconds, so a model's weights are
    read once, not at every run."""
    path = path.resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    return _memo_sha256(key, cache_root if cache_root is not None else reference_cache())


@functools.lru_cache(maxsize=256)
def _memo_sha256(key: tuple[str, int, int], cache_root: Path) -> str:
    name, size, mtime_ns = key
    record = cache_root / "hashes" / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.json"
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(record.read_text(encoding="utf-8"))
        if known.get("path") == name and known.get("size") == size and known.get("mtime_ns") == mtime_ns:
            return str(known["sha256"])
    digest = hash_file(hashlib.sha256(), Path(name)).hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache: hashed again next time
        write_atomic(record, json.dumps({"path": name, "size": size, "mtime_ns": mtime_ns, "sha256": digest}) + "\n")
    return digest


def _module_digest(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find the source of {name!r}")
    if spec.submodule_search_locations:
        files = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.py"))
    else:
        files = [Path(spec.origin)]
    return source_digest(files)


# ---- the cache ------------------------------------------------------------------------------------


def cached_logps(
    items: Sequence[Mapping[str, Any]],
    compute: Compute,
    *,
    fingerprint: str,
    batch_size: int,
    columns: Sequence[str],
    cache_root: Path | None = None,
    progress: bool = True,
    shard_items: int | None = None,
) -> torch.Tensor:
    """The reference values of ``items``, from the cache or computed and cached: (N, K) float32.

    ``compute(batch)`` runs the frozen reference on a list of items and returns a (len(batch), K)
    floating tensor (any device; K = ``len(columns)``, e.g. ``("ref_chosen_logps",
    "ref_rejected_logps")``); it is called under ``torch.no_grad()`` on batches of ``batch_size``
    items in dataset order (the last one of a shard may be shorter), so row ``i`` of the result is
    exactly (bit for bit) the float32 value ``compute`` gave for item ``i`` in that batch
    (float64 values are rounded to float32). Non-finite values are refused (``ValueError``).

    ``fingerprint``: from :func:`reference_fingerprint`. ``cache_root``: default
    :func:`losslab.paths.reference_cache`. ``shard_items``: items per shard file, a multiple of
    ``batch_size`` (default: :data:`SHARD_TARGET` rounded up to whole batches). ``progress``: a
    tqdm bar over the batches computed (rank 0 only). See the module docstring for the files,
    when a shard is trusted, and what happens under several processes
    (:mod:`losslab.train.shard_cache` does the storage).
    """
    if not FINGERPRINT.fullmatch(fingerprint):
        raise ValueError(f"fingerprint must be 32 lowercase hex digits (reference_fingerprint); got {fingerprint!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    columns = [str(c) for c in columns]
    if not columns or len(set(columns)) != len(columns):
        raise ValueError(f"columns must be distinct names, at least one; got {columns}")
    shard_items = shard_items if shard_items is not None else batch_size * math.ceil(SHARD_TARGET / batch_size)
    if shard_items < 1 or shard_items % batch_size:
        raise ValueError(f"shard_items must be a positive multiple of batch_size {batch_size}; got {shard_items}")
    k = len(columns)
    layout = ShardLayout(
        format=str(ENCODING_VERSION),
        header={"columns": json.dumps(columns), "batch_size": str(batch_size)},
        shard_items=shard_items,
        manifest={"columns": columns, "dtype": "float32", "batch_size": batch_size},
    )

    def compute_shard(start: int, stop: int, advance: Callable[[int], Any]) -> dict[str, torch.Tensor]:
        """Run ``compute`` over items [start, stop) in batches: the shard's (n, K) values."""
        parts = []
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            with torch.no_grad():
                out = compute([items[j] for j in range(a, b)])
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or tuple(out.shape) != (b - a, k):
                what = f"{type(out).__name__} {tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else out
                raise ValueError(
                    f"compute must return a floating ({b - a}, {k}) tensor for items {a}..{b - 1}; got {what}"
                )
            values = out.detach().to(device="cpu", dtype=torch.float32).contiguous()  # (b - a, K)
            bad = (~torch.isfinite(values)).any(dim=1).nonzero().flatten()
            if len(bad):
                rows = ", ".join(str(a + int(i)) for i in bad[:5])
                raise ValueError(f"the reference gave non-finite values for item(s) {rows} (not cached)")
            parts.append(values)
            advance(1)
        return {_TENSOR: torch.cat(parts)}  # (stop - start, K)

    def check(tensors: dict[str, torch.Tensor], start: int, stop: int) -> bool:
        values = tensors.get(_TENSOR)
        return values is not None and values.dtype == torch.float32 and tuple(values.shape) == (stop - start, k)

    shards = cached_shards(
        len(items),
        compute_shard,
        check,
        root=cache_root if cache_root is not None else reference_cache(),
        fingerprint=fingerprint,
        layout=layout,
        batches_of=lambda a, b: batch_count(a, b, batch_size),
        progress=progress,
        desc="reference log-probs",
    )
    done = [s[_TENSOR] for s in shards]
    return torch.cat(done) if done else torch.zeros(0, k, dtype=torch.float32)


# ---- on the fly -----------------------------------------------------------------------------------


def frozen_reference(
    model: str | None = None,
    *,
    like: torch.nn.Module | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """A frozen reference model for on-the-fly log-probs: loaded by name (``model``, through
    :func:`losslab.models.load_causal_lm` in ``dtype``) or a deep copy of ``like`` (the policy,
    taken before its first update); in eval mode (no dropout) with ``requires_grad`` off on every
    parameter; moved to ``device`` when given. Give exactly one of ``model`` and ``like``.

    Memory: the copy holds a second full set of weights (parameters x bytes per value: SmolLM2-135M
    in float32 is about 0.54 GB), but no gradients and no optimizer state (an AdamW-trained float32
    policy holds four times its weights), and run under ``torch.no_grad()`` it keeps no
    activations. A cached reference (:func:`cached_logps`) holds nothing during training: the
    reference is loaded for the precompute only, and the cache takes N x K x 4 bytes on disk.

    Keep the copy outside the trained model (not a submodule or attribute of it), so the optimizer,
    DDP/FSDP wrapping and checkpoints never see it; under torchrun each rank holds its own copy.
    With adapters (LoRA), the base model with the adapters disabled is the reference and needs no
    copy at all; a deep copy would copy the adapters too.
    """
    if (model is None) == (like is None):
        raise ValueError("give exactly one of model (a name to load) and like (a module to copy)")
    if like is not None:
        reference = copy.deepcopy(like)
    else:
        assert model is not None
        reference = load_causal_lm(model, dtype=dtype, trust_remote_code=trust_remote_code)
    reference.eval()
    reference.requires_grad_(False)
    if device is not None:
        reference.to(device)
    return reference
