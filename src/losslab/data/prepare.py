"""``losslab data prepare``: the embedded datasets as JSONL splits in a cache directory.

Layout: ``DIR/NAME/{train,validation,test}.jsonl`` and ``DIR/NAME/manifest.json`` (counts,
schema, origin, licence). Exact duplicate records are kept once, and a record's split is
fixed by a hash of its content (``Source.split_key``): 80 % train, 10 % validation, 10 % test,
so a text repeated in a source never lands in two splits. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from losslab.data.schemas import SCHEMAS
from losslab.data.sources import SOURCES, Source
from losslab.errors import UserError
from losslab.models import cache_dir

SPLITS = ("train", "validation", "test")
BUILTIN_DATA_PREFIX = "builtin:"


def data_dir(out: str | Path | None = None) -> Path:
    return Path(out).expanduser() if out else cache_dir() / "data"


def split_of(key: str) -> str:
    """80/10/10 by the first 8 bytes of sha256(key)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def write_atomic(path: Path, text: str) -> None:
    """Write a text file so a reader never sees it half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def hash_file(digest: Any, path: Path) -> Any:
    """Feed the bytes of ``path`` to a ``hashlib`` object in 1 MiB blocks; returns it."""
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


def prepare_source(source: Source, out: Path) -> dict:
    """Read, validate, split and write one dataset; returns its manifest."""
    schema = SCHEMAS[source.schema]
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    duplicates = 0
    for _key, record in tqdm(source.read(), desc=f"preparing {source.name}", unit=" records", leave=False, disable=None):
        schema.model_validate(record)  # our own readers must produce contract records
        line = json.dumps(record, ensure_ascii=False)
        if line in seen:
            duplicates += 1
            continue
        seen.add(line)
        lines[split_of(source.split_key(record))].append(line)
    folder = out / source.name
    for split in SPLITS:
        write_atomic(folder / f"{split}.jsonl", "".join(line + "\n" for line in lines[split]))
    manifest = {
        "name": source.name,
        "schema": source.schema,
        "records": sum(len(v) for v in lines.values()),
        "splits": {s: len(lines[s]) for s in SPLITS},
        "duplicates_dropped": duplicates,
        "origin": source.origin,
        "licence": source.licence,
    }
    write_atomic(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def prepare(names: list[str] | None = None, out: str | Path | None = None, *, force: bool = False) -> list[dict]:
    """Prepare the named datasets (all by default) unless already there; returns their manifests."""
    names = names or list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise UserError(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    root = data_dir(out)
    manifests = []
    for name in names:
        manifest_path = root / name / "manifest.json"
        if manifest_path.is_file() and not force:
            manifests.append(json.loads(manifest_path.read_text(encoding="utf-8")))
        else:
            manifests.append(prepare_source(SOURCES[name], root))
    return manifests


def resolve_data_path(spec: str, split: str = "train") -> Path:
    """A data file named in a config: ``builtin:NAME`` (a prepared split, prepared on demand)
    or a path to a file."""
    if spec.startswith(BUILTIN_DATA_PREFIX):
        name = spec[len(BUILTIN_DATA_PREFIX) :]
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        prepare([name])
        return data_dir() / name / f"{split}.jsonl"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"field 'data.{split}': data file not found: {spec}")
    return path


def format_summary(manifests: list[dict], root: Path) -> str:
    rows = [("dataset", "schema", "records", "train", "validation", "test")]
    for m in manifests:
        s = m["splits"]
        rows.append((m["name"], m["schema"], str(m["records"]), str(s["train"]), str(s["validation"]), str(s["test"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines + [f"written to {root}"])


def run_prepare(args: argparse.Namespace) -> int:
    manifests = prepare(args.only, args.out, force=args.force)
    print(format_summary(manifests, data_dir(args.out)))
    return 0
