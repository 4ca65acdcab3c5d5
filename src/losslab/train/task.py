"""What a training task is: the :class:`Task` interface every task module implements, and the
:class:`TaskRun` it builds for one config. The registry of tasks is :mod:`losslab.train.tasks`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from losslab.train.adapter import TaskForward
from losslab.train.config import TrainConfig
from losslab.train.plan import LossNeeds, LossPlan


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
