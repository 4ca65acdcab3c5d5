"""What an audit finds: :class:`Finding` (one problem, with its level and where it is) and
:class:`AuditReport` (the findings and the tables of one audit), and the exit status they give."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Level = Literal["info", "warning", "error"]
LEVELS: tuple[Level, ...] = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """One problem. ``kind``: a stable identifier (e.g. ``header_trained``), documented in
    docs/audit.md; ``where``: ``FILE:LINE`` of the record (or the config's file:line, or ``""``
    for a whole-dataset finding); ``count``: how many tokens/records it covers."""

    kind: str
    level: Level
    message: str
    where: str = ""
    count: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class AuditReport:
    """An audit's result: its findings and named tables (title -> rows of column -> value)."""

    title: str
    findings: list[Finding] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def at_or_above(self, level: Level) -> list[Finding]:
        floor = LEVELS.index(level)
        return [f for f in self.findings if LEVELS.index(f.level) >= floor]

    def exit_status(self, fail_on: Level) -> int:
        """0: no finding at or above ``fail_on``; 1: some (2, bad input, is the CLI's)."""
        return 1 if self.at_or_above(fail_on) else 0
