"""Weight schedules for the terms of a composite loss: a value at each optimiser step.

Every schedule has a linear warmup: for ``step < warmup_steps`` the value goes linearly
from ``warmup_start`` (default 0) at step 0 to ``start`` at step ``warmup_steps``. Then:

- ``constant``: ``start``;
- ``linear``: from ``start`` at ``warmup_steps`` to ``end`` at ``total_steps``, then ``end``;
- ``cosine``: ``end + (start - end) * (1 + cos(pi * progress)) / 2``, ``progress`` going
  from 0 at ``warmup_steps`` to 1 at ``total_steps``, then ``end``;
- ``step``: ``start * gamma^k``, ``k`` = the number of ``milestones`` <= step, or
  ``step // step_size``; never past ``end`` when ``end`` is given.

Config form: ``{schedule: cosine, start: 0.7, end: 0.1, warmup_steps: 100, total_steps: 1000}``;
``total_steps`` may be left out when the caller (the trainer) knows the run's length.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from losslab.errors import UserError
from losslab.losses.common import config_value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def _steps(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Base: ``start`` after a linear warmup from ``warmup_start`` over ``warmup_steps``."""

    kind: ClassVar[str] = ""
    start: float
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def __post_init__(self) -> None:
        _number("start", self.start)
        _number("warmup_start", self.warmup_start)
        _steps("warmup_steps", self.warmup_steps)

    def __call__(self, step: int) -> float:
        """The value at optimiser step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step}")
        if step < self.warmup_steps:
            return self.warmup_start + (self.start - self.warmup_start) * step / self.warmup_steps
        return self._after_warmup(step)

    def _after_warmup(self, step: int) -> float:
        return float(self.start)


@dataclass(frozen=True, kw_only=True)
class ConstantSchedule(Schedule):
    kind: ClassVar[str] = "constant"


@dataclass(frozen=True, kw_only=True)
class _Annealing(Schedule):
    """From ``start`` at ``warmup_steps`` to ``end`` at ``total_steps`` along ``_shape``."""

    end: float
    total_steps: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _number("end", self.end)
        _steps("total_steps", self.total_steps, self.warmup_steps + 1)

    def _after_warmup(self, step: int) -> float:
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.end + (self.start - self.end) * self._shape(progress)

    def _shape(self, progress: float) -> float:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class LinearSchedule(_Annealing):
    kind: ClassVar[str] = "linear"

    def _shape(self, progress: float) -> float:
        return 1.0 - progress


@dataclass(frozen=True, kw_only=True)
class CosineSchedule(_Annealing):
    kind: ClassVar[str] = "cosine"

    def _shape(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True, kw_only=True)
class StepSchedule(Schedule):
    kind: ClassVar[str] = "step"
    gamma: float = 0.1
    step_size: int | None = None
    milestones: Sequence[int] = ()
    end: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _number("gamma", self.gamma)
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0; got {self.gamma}")
        if (self.step_size is None) == (not self.milestones):
            raise ValueError("give exactly one of step_size (every N steps) or milestones (a list of steps)")
        if self.step_size is not None:
            _steps("step_size", self.step_size, 1)
        for m in self.milestones:
            _steps("milestones", m)
        if self.end is not None:
            _number("end", self.end)

    def _after_warmup(self, step: int) -> float:
        if self.step_size is not None:
            drops = step // self.step_size
        else:
            drops = sum(1 for m in self.milestones if step >= m)
        value = self.start * self.gamma**drops
        if self.end is None:
            return value
        return max(value, self.end) if self.end <= self.start else min(value, self.end)


SCHEDULES: dict[str, type[Schedule]] = {
    cls.kind: cls for cls in (ConstantSchedule, LinearSchedule, CosineSchedule, StepSchedule)
}

Weight = float | Schedule


def schedule_options(kind: str) -> list[str]:
    """The config keys a schedule of ``kind`` accepts, ``schedule`` first."""
    return ["schedule"] + [f.name for f in dataclasses.fields(SCHEDULES[kind])]


def build_schedule(config: Mapping[str, Any], *, total_steps: int | None = None, where: str | None = None) -> Schedule:
    """A schedule from its config dict; ``total_steps`` fills in a missing ``total_steps``.

    Raises :class:`UserError` naming what is allowed when the kind, a key or a value is bad.
    """
    kind = config.get("schedule")
    if kind not in SCHEDULES:
        raise UserError(f"unknown schedule {kind!r}; allowed: {', '.join(SCHEDULES)}", where=where)
    allowed = schedule_options(kind)
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise UserError(
            f"{kind} schedule: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}", where=where
        )
    kwargs = {k: config_value(v) for k, v in config.items() if k != "schedule"}
    if "total_steps" in allowed and "total_steps" not in kwargs and total_steps is not None:
        kwargs["total_steps"] = total_steps
    if "milestones" in kwargs and isinstance(kwargs["milestones"], list):
        kwargs["milestones"] = tuple(kwargs["milestones"])
    required = [f.name for f in dataclasses.fields(SCHEDULES[kind]) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in kwargs]
    if missing:
        hint = " (or a run length from the trainer)" if "total_steps" in missing else ""
        raise UserError(f"{kind} schedule needs {', '.join(missing)}{hint}; allowed: {', '.join(allowed)}", where=where)
    try:
        return SCHEDULES[kind](**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{kind} schedule: {exc}", where=where) from None


def build_weight(value: Any, *, total_steps: int | None = None, where: str | None = None) -> Weight:
    """A term weight from config: a number, or a schedule dict (see :func:`build_schedule`)."""
    if isinstance(value, Mapping):
        return build_schedule(value, total_steps=total_steps, where=where)
    try:
        return _number("weight", config_value(value))
    except TypeError:
        raise UserError(
            f"must be a number or a schedule {{schedule: ..., start: ...}}; got {value!r}", where=where
        ) from None


def weight_at(weight: Weight, step: int) -> float:
    """The value of a weight (number or schedule) at optimiser step ``step``."""
    return weight(step) if isinstance(weight, Schedule) else float(weight)
