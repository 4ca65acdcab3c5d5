"""The registry of training tasks: name -> the module that implements
:class:`~losslab.train.task.Task`. Adding a task is adding its module and one line here."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from losslab.train.task import Task

TASKS: dict[str, str | Task] = {
    "causal_lm": "losslab.train.tasks.causal_lm",
    "sequence_classification": "losslab.train.tasks.sequence_classification",
    "token_classification": "losslab.train.tasks.token_classification",
    "reward_model": "losslab.train.tasks.reward_model",
    "embedding": "losslab.train.tasks.embedding",
}
"""Task name -> its module's import path (imported on first use), or a :class:`Task` object."""


def get_task(name: str) -> Task:
    """The task called ``name``; configs are validated against :data:`TASKS`."""
    entry = TASKS[name]
    return cast("Task", importlib.import_module(entry)) if isinstance(entry, str) else entry
