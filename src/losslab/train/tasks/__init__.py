"""The registry of training tasks: name -> the module that implements
:class:`~losslab.train.task.Task` (imported on first use by :func:`~losslab.train.task.get_task`).
Adding a task is adding its module and one line here."""

from __future__ import annotations

from typing import Any

TASKS: dict[str, Any] = {
    "causal_lm": "losslab.train.tasks.causal_lm",
    "sequence_classification": "losslab.train.tasks.sequence_classification",
    "token_classification": "losslab.train.tasks.token_classification",
    "reward_model": "losslab.train.tasks.reward_model",
    "embedding": "losslab.train.tasks.embedding",
    "preference": "losslab.train.tasks.preference",
    "distill": "losslab.train.tasks.distill",
}
"""Task name -> its module's import path, or an object with the :class:`~losslab.train.task.Task` functions."""
