"""Reading record files with errors that name the file, the line and the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from losslab.errors import UserError


@dataclass
class Source:
    """Where a record came from: file and 1-based line (record index for non-line formats)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class SkipLog:
    """Counts records skipped under ``on_error: skip``, keeping the first messages."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < 20:
            self.examples.append(message)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: ``field.path: message``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"field {loc!r}: {err['msg']}")
    return "; ".join(parts)


def iter_raw_records(path: str | Path) -> Iterator[tuple[Source, Any]]:
    """Yield ``(source, parsed JSON value)`` for each record of a .jsonl/.json/.csv/.parquet file.

    JSON Lines are parsed here (so a bad line is reported with its number); other formats go
    through ``datasets`` and are numbered by record index (1-based).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson") or (suffix == ".json" and _looks_like_jsonl(path)):
        with path.open("rb") as fh:  # split on b"\n" only: "\r" or U+2028 inside a string is data
            for lineno, raw_line in enumerate(fh, 1):
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield Source(str(path), lineno), _BadJson(f"not UTF-8 (byte {exc.start + 1})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield Source(str(path), lineno), json.loads(line)
                except json.JSONDecodeError as exc:
                    yield Source(str(path), lineno), _BadJson(f"invalid JSON ({exc.msg} at column {exc.colno})")
        return
    if suffix == ".json":
        with path.open(encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise UserError(f"invalid JSON ({exc.msg})", where=f"{path}:{exc.lineno}") from None
        if not isinstance(data, list):
            raise UserError("a .json data file must hold a list of records", where=str(path))
        for i, rec in enumerate(data, 1):
            yield Source(str(path), i), rec
        return
    if suffix in (".csv", ".parquet"):
        import datasets

        ds = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
        for i, rec in enumerate(ds, 1):
            yield Source(str(path), i), rec
        return
    raise UserError(f"unsupported data file type {suffix!r}; use .jsonl, .json, .csv or .parquet", where=str(path))


def _looks_like_jsonl(path: Path) -> bool:
    with path.open(encoding="utf-8") as fh:
        head = fh.read(1).strip()
    return head == "{"


class _BadJson:
    def __init__(self, message: str) -> None:
        self.message = message


def load_records(
    path: str | Path,
    schema: type[BaseModel],
    *,
    on_error: str = "raise",
    skipped: SkipLog | None = None,
) -> Iterator[tuple[Source, BaseModel]]:
    """Yield ``(source, validated record)``; a bad record raises :class:`UserError` naming
    ``file:line`` and the field, or is counted in ``skipped`` when ``on_error == "skip"``."""
    if on_error not in ("raise", "skip"):
        raise UserError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
    for source, raw in iter_raw_records(path):
        if isinstance(raw, _BadJson):
            message = raw.message
        elif not isinstance(raw, dict):
            message = f"expected a JSON object, got {type(raw).__name__}"
        else:
            try:
                yield source, schema.model_validate(raw)
                continue
            except ValidationError as exc:
                message = describe_validation_error(exc)
        if on_error == "raise":
            raise UserError(message + " (set on_error: skip to skip such records)", where=str(source))
        if skipped is not None:
            skipped.add(f"{source}: {message}")
