"""Task adapters: what a task needs from a config (model, datasets, collator, loss inputs,
evaluation). ``losslab.train.run`` drives them all the same way; a task is one module and
one entry in :data:`TASKS`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from losslab.losses.composite import CompositeLoss
from losslab.train.config import TrainConfig


@dataclass
class TaskRun:
    """Everything the runner needs for one task and config.

    ``train``/``validation``/``test``: lists of feature dicts for ``collator``;
    ``make_loss_func(composite)``: the Trainer ``compute_loss_func`` (holds the composite);
    ``evaluate(model, dataset, split)``: metrics named ``split/metric``.
    """

    model: torch.nn.Module
    tokenizer: Any
    train: list[dict]
    validation: list[dict] | None
    test: list[dict] | None
    collator: Callable[[list[dict]], dict[str, torch.Tensor]]
    make_loss_func: Callable[[CompositeLoss], Any]
    evaluate: Callable[[torch.nn.Module, list[dict], str], dict[str, float]]
    summary: dict[str, Any]


def _causal_lm(config: TrainConfig) -> TaskRun:
    from losslab.train.tasks.causal_lm import build

    return build(config)


def _lazy(module: str) -> Callable[[TrainConfig], TaskRun]:
    """``losslab.train.tasks.<module>.build``, imported on first use."""

    def build(config: TrainConfig) -> TaskRun:
        return importlib.import_module(f"losslab.train.tasks.{module}").build(config)

    return build


def check_loss(config: TrainConfig) -> None:
    """``UserError`` (``where="loss.terms"``) if a loss term reads an input the task's batches do
    not provide; no model or data is loaded (for ``sequence_classification`` with
    ``label_type: auto``, the first training record is read)."""
    importlib.import_module(f"losslab.train.tasks.{config.task}").check_loss(config)


TASKS: dict[str, Callable[[TrainConfig], TaskRun]] = {
    "causal_lm": _causal_lm,
    **{task: _lazy(task) for task in ("sequence_classification", "token_classification", "reward_model", "embedding")},
}
