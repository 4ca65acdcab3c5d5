"""What a training task is and what it trains with: the :class:`Task` interface every task
module implements, the :class:`TaskRun` it builds, and the loss plan of a config
(:func:`plan_loss`: which terms, the config's or the task's default, checked before any model
or data is loaded). ``losslab train`` and ``losslab compare`` both call :func:`plan_loss`; the
run's composite is then built once, with the run's length, by :meth:`LossPlan.build`. The
registry of tasks is :mod:`losslab.train.tasks`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch

from losslab.errors import UserError
from losslab.losses.composite import CompositeLoss
from losslab.losses.registry import build_composite
from losslab.train.adapter import TaskForward
from losslab.train.config import TrainConfig
from losslab.train.tasks import TASKS

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


def plan_loss(
    config: TrainConfig, *, where: str = "loss.terms", term_where: Callable[[int], str] | None = None
) -> LossPlan:
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
    checked = build_composite(
        terms, total_steps=length or ANY_RUN_LENGTH, where=term_where or (lambda i: f"{where}[{i}]")
    )
    plan = LossPlan(terms, is_default, note, needs, checked)
    problems = plan.missing(needs.provides)
    if problems:
        raise UserError(
            f"{'; '.join(problems)}; a {needs.label} batch provides {', '.join(sorted(needs.provides))}", where=where
        )
    return plan


ANY_RUN_LENGTH = 1 << 40
"""The run length a schedule without ``total_steps`` is checked with before the run's is known."""


@dataclass
class TaskRun:
    """Everything the runner needs for one task and config.

    ``train``/``validation``/``test``: lists of feature dicts for ``collator``;
    ``forward``: the task's :data:`~losslab.train.adapter.TaskForward` (the runner wraps it in
    the one :class:`~losslab.train.adapter.LossAdapter`); ``shifts_labels``: the batch's
    ``labels`` are unshifted next-token labels; ``evaluate(model, dataset, split)``: metrics
    named ``split/metric``; ``summary``: what the run writes to ``summary.json``.
    """

    model: torch.nn.Module
    tokenizer: Any
    train: list[dict]
    validation: list[dict] | None
    test: list[dict] | None
    collator: Callable[[list[dict]], dict[str, torch.Tensor]]
    forward: TaskForward
    evaluate: Callable[[torch.nn.Module, list[dict], str], dict[str, float]]
    summary: dict[str, Any]
    shifts_labels: bool = False


class Task(Protocol):
    """A training task: a module (or any object) with these functions, listed in
    :data:`losslab.train.tasks.TASKS`."""

    def loss_needs(self, config: TrainConfig) -> LossNeeds:
        """The task's default terms and the loss inputs its batches provide (no model or data loaded)."""
        ...

    def metric_names(self, config: TrainConfig) -> set[str]:
        """The ``split/metric`` names its evaluation produces for ``config`` (checked by studies up front)."""
        ...

    def build(self, config: TrainConfig, plan: LossPlan) -> TaskRun:
        """Load the tokenizer, data and model; the batches feed the terms of ``plan``."""
        ...


def get_task(name: str) -> Task:
    """The task called ``name``; configs are validated against :data:`~losslab.train.tasks.TASKS`."""
    entry = TASKS[name]
    return cast(Task, importlib.import_module(entry)) if isinstance(entry, str) else entry
