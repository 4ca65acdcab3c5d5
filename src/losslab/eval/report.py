"""Metric tables (fixed-width text and Markdown) and an atomic ``metrics.json`` writer.

Metric names are flat and namespaced by split: ``validation/f1_macro``, ``test/bleu``,
``test/f1/PER``. The tables pivot on the first ``/``: one row per metric, one column per split
(keys without a ``/`` go to a column named ``value``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

Number = float | int


def namespace(metrics: Mapping[str, Number], prefix: str) -> dict[str, Number]:
    """``{f"{prefix}/{name}": value}``; ``prefix`` ``""`` returns a plain copy."""
    if not prefix:
        return dict(metrics)
    prefix = prefix.rstrip("/")
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def format_value(value: Number | None, digits: int = 4) -> str:
    """Ints as ints; floats with ``digits`` decimals, scientific when very large or tiny."""
    if value is None:
        return "-"
    if isinstance(value, (bool, int)):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 0.5 * 10.0**-digits):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, first_left: bool = True) -> str:
    """A fixed-width table: the first column left-aligned (when ``first_left``), others right.

    ``rows`` may contain empty lists, printed as blank lines (sections, as in scikit-learn's
    classification report).
    """
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            parts.append(cell.ljust(widths[i]) if i == 0 and first_left else cell.rjust(widths[i]))
        return "  ".join(parts).rstrip()

    return "\n".join([line(header)] + [line(r) if r else "" for r in rows])


def format_markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table: first column left-aligned, the others right-aligned.

    Empty rows are skipped; ``|`` inside cells is escaped.
    """

    def cells(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    sep = "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"
    return "\n".join([cells(header), sep] + [cells(r) for r in rows if r])


def _pivot(metrics: Mapping[str, Number | None], digits: int) -> tuple[list[str], list[list[str]]]:
    """Rows = metric names (without the split), columns = splits, in order of first appearance."""
    splits: list[str] = []
    names: list[str] = []
    cells: dict[tuple[str, str], Number | None] = {}
    for key, value in metrics.items():
        split, sep, name = key.partition("/")
        if not sep:
            split, name = "value", key
        if split not in splits:
            splits.append(split)
        if name not in names:
            names.append(name)
        cells[(name, split)] = value
    rows = [[n] + [format_value(cells.get((n, s)), digits) for s in splits] for n in names]
    return ["metric", *splits], rows


def format_metrics_table(metrics: Mapping[str, Number | None], *, digits: int = 4) -> str:
    """A fixed-width table of a flat metric dict, one column per split.

    >>> print(format_metrics_table({"validation/loss": 1.5, "test/loss": 1.25}))
    metric  validation    test
    loss        1.5000  1.2500
    """
    if not metrics:
        return "(no metrics)"
    header, rows = _pivot(metrics, digits)
    return format_table(header, rows)


def format_metrics_markdown(metrics: Mapping[str, Number | None], *, digits: int = 4) -> str:
    """The same table as :func:`format_metrics_table`, in Markdown."""
    if not metrics:
        return "_no metrics_"
    header, rows = _pivot(metrics, digits)
    return format_markdown_table(header, rows)


def _json_number(key: str, value: object) -> Number | None:
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or hasattr(value, "__float__")):
        raise TypeError(f"metric {key!r} must be a number; got {type(value).__name__}")
    if isinstance(value, numbers.Integral):  # Python and numpy integers stay integers
        return int(value)
    value = float(value)  # numpy / 0-d torch scalars
    return value if math.isfinite(value) else None


def write_metrics_json(metrics: Mapping[str, Number], path: str | os.PathLike[str]) -> Path:
    """Write ``metrics`` to ``path`` atomically (temp file in the same folder + ``os.replace``).

    Keys must be strings, values numbers (Python, numpy or 0-d torch scalars). Integers stay
    integers; NaN and infinities are written as ``null`` (strict JSON has no NaN). Key order
    is kept. A reader never sees a half-written file: it sees the old file or the new one.
    """
    data: dict[str, Number | None] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be strings; got {key!r}")
        data[key] = _json_number(key, value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metrics_json(path: str | os.PathLike[str]) -> dict[str, Number | None]:
    """Read a file written by :func:`write_metrics_json` (``null`` comes back as ``None``)."""
    with Path(path).open(encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of metrics")  # noqa: TRY004  (bad file content)
    return data
