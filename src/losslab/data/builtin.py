"""The builtin datasets as JSONL splits in a cache folder, and the data files a config names.

``builtin:NAME`` in a config (or ``losslab data prepare``) prepares dataset NAME of
:data:`losslab.data.sources.SOURCES` on first use. Layout: ``DIR/NAME/{train,validation,test}.jsonl``
and ``DIR/NAME/manifest.json`` (counts, schema, origin, licence). Exact duplicate records are
kept once, and a record's split is fixed by a hash of its content (``BuiltinDataset.split_key``):
80 % train, 10 % validation, 10 % test, so a text repeated in a source never lands in two
splits. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tqdm import tqdm

from losslab.data.schemas import SCHEMAS
from losslab.data.sources import SOURCES, BuiltinDataset
from losslab.errors import UserError
from losslab.files import write_atomic
from losslab.paths import data_cache

SPLITS = ("train", "validation", "test")
BUILTIN_DATA_PREFIX = "builtin:"


def data_dir(out: str | Path | None = None) -> Path:
    """Where the builtin datasets are prepared: ``out`` when given, else ``cache_dir()/data``."""
    return Path(out).expanduser() if out else data_cache()


def split_of(key: str) -> str:
    """80/10/10 by the first 8 bytes of sha256(key)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def prepare_source(source: BuiltinDataset, out: Path) -> dict:
    """Read, validate, split and write one dataset; returns its manifest."""
    schema = SCHEMAS[source.schema]
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    duplicates = 0
    for _key, record in tqdm(
        source.read(), desc=f"preparing {source.name}", unit=" records", leave=False, disable=None
    ):
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
