"""Class and tag vocabularies of the classification tasks, and a record's label id."""

from __future__ import annotations

from collections.abc import Sequence

from losslab.data.records import Source
from losslab.errors import UserError


def label_vocabulary(config_names: list[str] | None, found: Sequence[str], *, first: str | None = None) -> list[str]:
    """Class names in id order: ``data.label_names`` if set, else the sorted names found (with
    ``first``, e.g. ``O``, moved to the front when present)."""
    if config_names:
        if len(set(config_names)) != len(config_names):
            raise UserError("data.label_names has repeated names", where="data.label_names")
        return list(config_names)
    names = sorted(set(found))
    if first is not None and first in names:
        names.remove(first)
        names.insert(0, first)
    return names


def label_id(label2id: dict[str, int], name: str, source: Source, field: str = "label") -> int:
    """The id of a class name, or a :class:`UserError` naming the record and the known names."""
    if name not in label2id:
        known = ", ".join(label2id) if len(label2id) <= 30 else f"{len(label2id)} names"
        raise UserError(
            f"field {field!r}: unknown label {name!r} (known: {known}; set data.label_names to fix the set)",
            where=str(source),
        )
    return label2id[name]
