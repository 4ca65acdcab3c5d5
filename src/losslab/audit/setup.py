"""What the training audits run on: a config's task built as ``losslab train`` builds it (model,
tokenizer, samples, collator, loss), in float64 and without dropout, with the fixed batch of the
first ``B`` training samples (:func:`build_setup`); and a user's ``compute_loss_func`` named on
the command line (:func:`load_loss_func`)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from losslab.errors import UserError
from losslab.masking import PackedCollator, PaddedCollator
from losslab.train.adapter import LossAdapter
from losslab.train.config import TrainConfig
from losslab.train.task import LossPlan, TaskRun, get_task, plan_loss

MAX_BATCH = 8
"""The audit's batch B: the config's ``batch_size x grad_accum``, at most this, at least 2, even."""


def audit_batch(config: TrainConfig) -> int:
    """B: the step's samples per process in the config, capped at :data:`MAX_BATCH`, made even."""
    b = min(MAX_BATCH, config.training.batch_size * config.training.grad_accum)
    return max(2, b - b % 2)


def prepared_config(config: TrainConfig, batch: int) -> TrainConfig:
    """``config`` as the audit builds it: float64 weights, and only as many training records as the
    fixed batch needs (the first ones, so the batch is the same as in the full run); no evaluation."""
    data = config.data.model_copy(
        update={"max_train_samples": min(config.data.max_train_samples or 4 * batch, 4 * batch)}
    )
    return config.model_copy(update={"dtype": "float64", "data": data})


@dataclass
class AuditSetup:
    """A built config: ``run`` (the task's model, collator, forward), ``plan`` (its loss terms),
    ``samples`` (the fixed batch, B samples), ``padded``/``packed`` collators (causal LMs; None
    for other tasks)."""

    config: TrainConfig
    plan: LossPlan
    run: TaskRun
    samples: list[dict]
    padded: Callable[[list[dict]], dict[str, Any]]
    packed: Callable[[list[dict]], dict[str, Any]] | None

    def adapter(self) -> LossAdapter:
        """A fresh loss adapter (the run's composite at step 0), as ``losslab train`` makes it."""
        return LossAdapter(
            self.plan.build(max(1, self.config.training.max_steps)),
            self.run.forward,
            model=self.run.model,
            shifts_labels=self.run.shifts_labels,
        )


def build_setup(config: TrainConfig, batch: int) -> AuditSetup:
    """Build ``config`` (already :func:`prepared_config`-ed) and take its first ``batch`` samples."""
    from transformers import set_seed

    from losslab.audit.one_step import without_dropout

    plan = plan_loss(config)
    set_seed(config.seed)
    run = get_task(config.task).build(config, plan)
    if len(run.train) < batch:
        raise UserError(
            f"the audit needs {batch} training samples and the data gives {len(run.train)}",
            where=f"{config.data.train}",
        )
    without_dropout(run.model)
    run.model.train()
    causal = config.task == "causal_lm"
    padded = PaddedCollator(run.tokenizer.pad_token_id) if causal else run.collator
    return AuditSetup(config, plan, run, run.train[:batch], padded, PackedCollator() if causal else None)


def load_loss_func(spec: str) -> Callable[..., torch.Tensor]:
    """The callable named by ``spec``: ``package.module:function`` (imported; the current folder is
    on the path) or ``path/to/file.py:function``."""
    where = "--loss-func"
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UserError(f"{spec!r}: give MODULE:FUNCTION or FILE.py:FUNCTION", where=where)
    path = Path(target).expanduser()
    try:
        if target.endswith(".py") or path.is_file():
            if not path.is_file():
                raise UserError(f"file not found: {path}", where=where)
            module_spec = importlib.util.spec_from_file_location(f"losslab_audit_loss_{path.stem}", path)
            if module_spec is None or module_spec.loader is None:
                raise UserError(f"cannot import {path}", where=where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as exc:  # (any error of the user's module while importing it)
        raise UserError(f"cannot import {target}: {type(exc).__name__}: {exc}", where=where) from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{target} has no function {name!r}", where=where)
    return fn
