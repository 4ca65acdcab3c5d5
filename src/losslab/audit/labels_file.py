"""Reading another framework's labels: one JSON line per record of the data, in the same order.

A line is ``{"input_ids": [...], "labels": [...]}`` (``labels[i] == -100``: token i is not
trained; labels NOT shifted, as a transformers model takes them) or ``{"input_ids": [...],
"assistant_masks": [...]}`` (1: trained), or ``completion_mask`` like ``assistant_masks``.
An optional ``attention_mask`` drops the padding (positions where it is 0) first. Anything
else is a ``UserError`` naming the labels file's line and the field (exit 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from losslab.data.records import parse_json
from losslab.errors import UserError
from losslab.labels import IGNORE_INDEX

MASK_FIELDS = ("labels", "assistant_masks", "completion_mask")


@dataclass
class ForeignLabels:
    """One record's labels as another framework produced them (arrays of length T')."""

    file: str
    line: int
    input_ids: np.ndarray  # (T',) int64
    trained: np.ndarray  # (T',) bool
    values: np.ndarray | None  # (T',) int64 label values (None for a 0/1 mask)
    field: str  # which field held the mask

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def iter_label_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line (blank lines are skipped, as in data files)."""
    with Path(path).open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if raw.strip():
                try:
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(f"not UTF-8 (byte {exc.start + 1})", where=f"{path}:{lineno}") from None


def parse_labels(file: str, line: int, text: str, vocab_size: int) -> ForeignLabels:
    """One line of a labels file, checked: ids inside the vocabulary, equal lengths, 0/1 masks."""
    where = f"{file}:{line}"
    try:
        value = parse_json(text)
    except ValueError as exc:
        raise UserError(str(exc), where=where) from None
    if not isinstance(value, dict):
        raise UserError(f"expected a JSON object with input_ids and labels, got {type(value).__name__}", where=where)
    ids = _ints(value, "input_ids", where)
    if ids is None:
        raise UserError("field 'input_ids' is missing", where=where)
    present = [f for f in MASK_FIELDS if f in value]
    if len(present) != 1:
        what = "none of" if not present else "more than one of"
        raise UserError(f"{what} the fields {', '.join(MASK_FIELDS)}: give exactly one", where=where)
    name = present[0]
    mask = _ints(value, name, where)
    assert mask is not None
    _same_length(mask, ids, name, where)
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if len(bad):
        k = int(bad[0])
        raise UserError(
            f"field 'input_ids[{k}]': token id {int(ids[k])} is outside the tokenizer's vocabulary (0..{vocab_size - 1}); "
            "the labels were made with another tokenizer?",
            where=where,
        )
    if name == "labels":
        bad = np.flatnonzero((mask != IGNORE_INDEX) & ((mask < 0) | (mask >= vocab_size)))
        if len(bad):
            k = int(bad[0])
            raise UserError(
                f"field 'labels[{k}]': {int(mask[k])} is neither {IGNORE_INDEX} nor a token id (0..{vocab_size - 1})",
                where=where,
            )
        trained, values = mask != IGNORE_INDEX, mask
    else:
        bad = np.flatnonzero((mask != 0) & (mask != 1))
        if len(bad):
            k = int(bad[0])
            raise UserError(f"field '{name}[{k}]': {int(mask[k])} is not 0 or 1", where=where)
        trained, values = mask == 1, None
    if "attention_mask" in value:
        attention = _ints(value, "attention_mask", where)
        assert attention is not None
        _same_length(attention, ids, "attention_mask", where)
        keep = attention != 0
        ids, trained = ids[keep], trained[keep]
        values = values[keep] if values is not None else None
    return ForeignLabels(file, line, ids, trained, values, name)


def _ints(value: dict, name: str, where: str) -> np.ndarray | None:
    items = value.get(name)
    if items is None:
        return None
    if not isinstance(items, list):
        raise UserError(f"field {name!r}: expected a list of integers, got {type(items).__name__}", where=where)
    if items and isinstance(items[0], list) and len(items) == 1:
        items = items[0]  # a batch of one, as a collator returns it
    try:
        arr = np.asarray(items)
    except (ValueError, OverflowError):
        arr = np.asarray(items, dtype=object)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim == 1 and (arr.dtype.kind in "iu" or (arr.dtype.kind == "b" and name != "input_ids")):
        return arr.astype(np.int64)
    for k, item in enumerate(items):  # say which item is wrong
        if not isinstance(item, int) or (isinstance(item, bool) and name == "input_ids") or abs(item) >= 2**63:
            raise UserError(f"field '{name}[{k}]': expected an integer, got {item!r}", where=where)
    raise UserError(f"field {name!r}: expected a list of integers", where=where)


def _same_length(mask: np.ndarray, ids: np.ndarray, name: str, where: str) -> None:
    if len(mask) != len(ids):
        raise UserError(
            f"field {name!r}: {len(mask)} values for {len(ids)} input_ids (one per token expected)", where=where
        )
