"""Reading record files (.jsonl, .json, .csv, .parquet) with errors that name the file, the line
and the field.

:func:`load_records` yields ``(Source, validated record)`` (a :class:`Source` is a record's
``file:line``); :func:`iter_raw_records` yields the parsed values before validation; strict
JSON parsing (:func:`parse_json`), pydantic errors as one line per field, and :class:`SkipLog`
for ``on_error: skip``.
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from losslab.errors import UserError
from losslab.files import read_utf8

SKIP_HINT = " (to skip such records: data.on_error: skip in a config, --on-error skip for losslab inspect)"


@dataclass
class Source:
    """Where a record came from: file and 1-based line (record index for non-line formats)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class SkipLog:
    """Counts records skipped under ``on_error: skip``, keeping the first ``limit`` messages
    (``file:line: reason``)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    limit: int = 1000

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < self.limit:
            self.examples.append(message)

    def to_dict(self) -> dict[str, Any]:
        """``{"count": n, "records": ["file:line: reason", ...]}`` (the first ``limit`` of them)."""
        return {"count": self.count, "records": list(self.examples)}


def describe_validation_error(exc: ValidationError) -> str:
    """One entry per field: ``field 'path': message`` (the alternatives of a union joined by "or")."""
    problems: dict[str, list[str]] = {}
    for err in exc.errors():
        # a union (``str | int``) adds its member types to the path: drop them, but never the
        # name of an unknown key, whatever it looks like (``Unnamed: 0``, ``größe``, ``str``)
        *parents, last = err["loc"] or ("record",)
        kept = [p for p in parents if not _union_member(p)]
        if err["type"] == "extra_forbidden" or not _union_member(last):
            kept.append(last)
        loc = ".".join(str(p) for p in kept) or "record"
        message = err["msg"].removeprefix("Value error, ")
        if message not in problems.setdefault(loc, []):
            problems[loc].append(message)
    return "; ".join(f"field {loc!r}: {' or '.join(msgs)}" for loc, msgs in problems.items())


def _union_member(part: int | str) -> bool:
    """Whether a ``loc`` part is pydantic's name of a union member (``str``, ``list[str]``,
    ``function-after[...]``) rather than a field name or an index."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "bytes", "none"} or "[" in part)


def parse_json(text: str) -> Any:
    """``json.loads`` for data: NaN, Infinity and numbers that overflow to inf are errors (not
    JSON, and they would train on NaN); so is nesting too deep to parse. Raises ``ValueError``
    with a message for the user."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply)") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON ({name} is not a JSON number)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"invalid JSON (number {text[:40]} is too large for a float)")
    return value


def iter_raw_records(path: str | Path) -> Iterator[tuple[Source, Any]]:
    """Yield ``(source, parsed JSON value)`` for each record of a .jsonl/.json/.csv/.parquet file
    (an :class:`UnreadableRecord` in place of a JSON Lines record that cannot be read).

    JSON Lines are parsed here (so a bad line is reported with its number); other formats go
    through ``datasets`` and are numbered by record index (1-based). A UTF-8 byte-order mark
    at the start of a JSON file is accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson") or (suffix == ".json" and _looks_like_jsonl(path)):
        with path.open("rb") as fh:  # split on b"\n" only: "\r" or U+2028 inside a string is data
            for lineno, raw_line in enumerate(fh, 1):
                try:
                    line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    bom = 3 if lineno == 1 and raw_line.startswith(codecs.BOM_UTF8) else 0  # counted after it
                    yield Source(str(path), lineno), UnreadableRecord(f"not UTF-8 (byte {exc.start + bom + 1})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield Source(str(path), lineno), parse_json(line)
                except ValueError as exc:
                    yield Source(str(path), lineno), UnreadableRecord(str(exc))
        return
    if suffix == ".json":
        text = read_utf8(path)
        try:
            data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
        except json.JSONDecodeError as exc:
            raise UserError(f"invalid JSON ({exc.msg})", where=f"{path}:{exc.lineno}") from None
        except RecursionError:
            raise UserError("invalid JSON (nested too deeply)", where=str(path)) from None
        except ValueError as exc:
            raise UserError(str(exc), where=str(path)) from None
        if not isinstance(data, list):
            raise UserError("a .json data file must hold a list of records", where=str(path))
        for i, rec in enumerate(data, 1):
            yield Source(str(path), i), rec
        return
    if suffix in (".csv", ".parquet"):
        yield from _iter_table(path, suffix[1:])
        return
    raise UserError(f"unsupported data file type {suffix!r}; use .jsonl, .json, .csv or .parquet", where=str(path))


def _iter_table(path: Path, kind: str) -> Iterator[tuple[Source, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001  (pyarrow / datasets errors: a malformed or empty file)
        cause = exc
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
        raise UserError(
            f"cannot read this {kind} file: {type(cause).__name__}: {str(cause)[:300]}", where=str(path)
        ) from None
    for i, rec in enumerate(ds, 1):
        yield Source(str(path), i), rec


def _looks_like_jsonl(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(64).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1] == b"{"


class UnreadableRecord:
    """What :func:`iter_raw_records` yields for a JSON Lines record it cannot read (not UTF-8,
    invalid JSON), in place of the parsed value: the reason, for the caller to report or skip."""

    def __init__(self, message: str) -> None:
        self.message = message


RecordT = TypeVar("RecordT", bound=BaseModel)


def load_records(
    path: str | Path,
    schema: type[RecordT],
    *,
    on_error: str = "raise",
    skipped: SkipLog | None = None,
) -> Iterator[tuple[Source, RecordT]]:
    """Yield ``(source, validated record)``; a bad record raises :class:`UserError` naming
    ``file:line`` and the field, or is counted in ``skipped`` when ``on_error == "skip"``."""
    if on_error not in ("raise", "skip"):
        raise UserError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
    for source, raw in iter_raw_records(path):
        if isinstance(raw, UnreadableRecord):
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
            raise UserError(message + SKIP_HINT, where=str(source))
        if skipped is not None:
            skipped.add(f"{source}: {message}")
