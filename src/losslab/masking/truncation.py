"""Truncation to ``max_length`` tokens, cutting the end (keep the start) or the start (keep the end).

Truncation works on tokens, after the mask is built, so a cut never changes how the kept
tokens were tokenised. A sample left with no trained token is not passed on: the builder
drops it and counts it (``BuildStats.dropped``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from losslab.errors import UserError

SIDES = ("end", "start")
T = TypeVar("T")


def check_side(side: str) -> str:
    if side not in SIDES:
        raise UserError(f"truncation must be 'end' (cut the end, keep the start) or 'start'; got {side!r}")
    return side


def truncation_slice(length: int, max_length: int | None, side: str = "end") -> slice:
    """The slice of a ``length``-token sample that survives truncation."""
    check_side(side)
    if max_length is None or length <= max_length:
        return slice(0, length)
    if max_length < 1:
        raise UserError(f"max_length must be >= 1; got {max_length}")
    return slice(0, max_length) if side == "end" else slice(length - max_length, length)


def truncate(seq: Sequence[T], max_length: int | None, side: str = "end") -> list[T]:
    """``seq`` cut to ``max_length`` items from the given ``side``."""
    return list(seq[truncation_slice(len(seq), max_length, side)])
