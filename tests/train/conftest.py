"""Helpers shared by the training tests."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest


def _child_pids(parent: int, cmdline_has: bytes | None = None) -> list[int]:
    """The processes whose parent is ``parent`` (from /proc) whose command line contains
    ``cmdline_has``; without it, those with the parent's own command line (forked children,
    not a resource tracker or another helper)."""
    own = Path(f"/proc/{parent}/cmdline").read_bytes()
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and (cmdline == own if cmdline_has is None else cmdline_has in cmdline):
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def child_pids() -> Callable[..., list[int]]:
    """``child_pids(parent, cmdline_has=None)``: see :func:`_child_pids`."""
    return _child_pids


def signals_delivered(pids: Iterable[int], signals: Iterable[signal.Signals]) -> bool:
    """None of ``signals`` is still pending for any of ``pids`` (read from /proc): each was ignored,
    handled or has ended its process. A process that is gone counts as delivered."""
    mask = sum(1 << (int(s) - 1) for s in signals)
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        pending = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
        if any(p & mask for p in pending):
            return False
    return True
