"""A run's loss plan: which terms it trains with (the config's, or its task's default) and the
check, before any model or data is loaded, that the task's batches feed every term.

``losslab train`` and ``losslab compare`` both call :func:`plan_loss`; the run's composite is
then built once, with the run's length, by :meth:`LossPlan.build`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from losslab.errors import UserError
from losslab.losses.composite import CompositeLoss
from losslab.losses.registry import build_composite
from losslab.train.config import TrainConfig
from losslab.train.tasks import get_task

REGULARISER_FIELDS = frozenset({"model", "reference_params"})
"""Loss inputs that every task gives (the adapter sets them)."""


@dataclass(frozen=True)
class LossNeeds:
    """What a task offers its loss: ``label`` (the task, as messages name it), the terms it
    trains with when ``loss.terms`` is unset, and the :class:`LossInputs` fields its batches fill."""

    label: str
    default_terms: tuple[Mapping[str, Any], ...]
    provides: frozenset[str]


@dataclass(frozen=True)
class LossPlan:
    """The terms of a run, checked against what its task provides.

    ``note``: which terms, and whether they are the task's default (for the run summary).
    """

    terms: list[dict[str, Any]]
    is_default: bool
    note: str
    needs: LossNeeds
    checked: CompositeLoss  # built from the terms with a run length that fits any schedule; for questions only

    def missing(self, present: set[str] | frozenset[str]) -> list[str]:
        """One sentence per term that batches with the fields ``present`` cannot feed."""
        return self.checked.missing_inputs(set(present) | REGULARISER_FIELDS)

    def requires(self, field: str) -> bool:
        """True when some term cannot be computed without the task's optional field ``field``."""
        return bool(self.missing(self.needs.provides - {field}))

    def uses(self, name: str) -> bool:
        """True when a term is the catalogue's loss ``name``."""
        return any(t.name == name for t in self.checked.terms)

    def build(self, total_steps: int) -> CompositeLoss:
        """The run's composite; ``total_steps`` completes weight schedules that leave it out."""
        return build_composite(self.terms, total_steps=total_steps)


def plan_loss(config: TrainConfig, *, where: str = "loss.terms",
              term_where: Callable[[int], str] | None = None) -> LossPlan:
    """The loss plan of ``config`` (``loss.terms``, or the task's default when unset).

    Raises :class:`UserError` for a bad term (at ``term_where(i)``, default ``where[i]``) or a
    term the task's batches cannot feed (at ``where``). Reads no model and no data, except the
    first training record where a task's defaults depend on it (``sequence_classification``
    with ``label_type: auto``).
    """
    needs = get_task(config.task).loss_needs(config)
    is_default = config.loss.terms is None
    terms = [dict(t) for t in (needs.default_terms if config.loss.terms is None else config.loss.terms)]
    names = ", ".join(str(t.get("name")) for t in terms)
    note = f"{names} (the {needs.label} default; set loss.terms to change it)" if is_default else names
    # the run's length is known once its data is read: the check takes the configured one, else any
    length = config.training.max_steps if config.training.max_steps > 0 else None
    checked = build_composite(terms, total_steps=length or ANY_RUN_LENGTH,
                              where=term_where or (lambda i: f"{where}[{i}]"))
    plan = LossPlan(terms, is_default, note, needs, checked)
    problems = plan.missing(needs.provides)
    if problems:
        raise UserError(f"{'; '.join(problems)}; a {needs.label} batch provides {', '.join(sorted(needs.provides))}",
                        where=where)
    return plan


ANY_RUN_LENGTH = 1 << 40
"""The run length a schedule without ``total_steps`` is checked with before the run's is known."""
