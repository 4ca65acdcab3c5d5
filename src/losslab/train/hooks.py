"""A per-evaluation hook for :func:`losslab.train.run.train` (e.g. Optuna pruning).

``hook(step, validation_metrics)`` is called after each of the Trainer's evaluations
(``training.eval_steps``, or every epoch): ``step`` is the optimizer step, and
``validation_metrics()`` computes, on demand, the task's own validation metrics (the same
``validation/...`` names and values as the final ``metrics.json``; it costs one evaluation
of the validation split, with generation when ``eval.generate`` is on). The hook may raise
to stop the run right there (no final model, no ``metrics.json``): that is how a pruned
Optuna trial ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

EvaluationHook = Callable[[int, Callable[[], dict[str, float]]], None]


class EvaluationHookCallback(TrainerCallback):
    """Calls ``hook(step, validation_metrics)`` on every evaluation (see the module docstring)."""

    def __init__(self, hook: EvaluationHook, validation_metrics: Callable[[], dict[str, float]]) -> None:
        self.hook = hook
        self.validation_metrics = validation_metrics

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.hook(state.global_step, self.validation_metrics)
