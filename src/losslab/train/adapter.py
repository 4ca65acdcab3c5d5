"""The one seam between losslab's losses and ``transformers.Trainer``: :class:`LossAdapter`.

Every task gives a forward, ``(model, batch) -> LossInputs``; the adapter adds the counts the
Trainer knows (``num_items_in_batch``, the step's trained rows), the model and the ``l2_sp``
anchor, evaluates the composite at the current step and keeps every term for the log.
Normalisation under accumulation and several processes is explained in docs/training.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from losslab.losses.composite import CompositeLoss, CompositeOutput, LossInputs

TaskForward = Callable[[torch.nn.Module, dict[str, Any]], LossInputs]
"""A task's forward: runs ``model`` (the one the Trainer passes, DDP-wrapped or not) on a
collated batch and returns the batch fields of :class:`LossInputs`."""

OutputsToInputs = Callable[[Any, torch.Tensor], LossInputs]
"""``(model outputs, labels) -> LossInputs``: what a plain Trainer's ``compute_loss_func`` is given."""


class TermAverager:
    """Every term's value between two log lines, exact under accumulation and several processes.

    Training: the composite's values are each micro-batch's share of its optimizer step
    (see ``CompositeLoss(per_batch_scale=...)``), so they are summed within a step (``group``),
    summed over processes, and averaged over the steps since the last log line.
    Evaluation (``group=None``): each batch is its own group, averaged over batches and processes.

    Monitor values (``LossInputs.monitor``: batch statistics, not loss terms) are plain means over
    the micro-batches (and processes) that gave them since the last pop, logged under their own
    names; a NaN value (a statistic the batch could not give) is left out of its mean.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.groups: set[Any] = set()
        self.calls = 0
        self.weights: dict[str, float] = {}
        self.monitor_sums: dict[str, float] = {}
        self.monitor_counts: dict[str, float] = {}

    def add_monitor(self, values: dict[str, torch.Tensor]) -> None:
        """Adds one micro-batch's monitor values (scalars)."""
        for name, value in values.items():
            number = float(value.detach())
            self.monitor_sums.setdefault(name, 0.0)
            self.monitor_counts.setdefault(name, 0.0)
            if not math.isnan(number):
                self.monitor_sums[name] += number
                self.monitor_counts[name] += 1.0

    def add(self, out: CompositeOutput, group: Any = None) -> None:
        self.calls += 1
        self.groups.add(group if group is not None else ("call", self.calls))
        for label, value in out.values.items():
            self.sums[label] = self.sums.get(label, 0.0) + float(value.detach())
        self.weights = dict(out.weights)

    def pop(self, prefix: str = "", *, shares: bool = True) -> dict[str, float]:
        """Means since the last pop as ``{prefix}loss/LABEL`` and ``{prefix}weight/LABEL``.
        Collective under ``torch.distributed``: call it on every process."""
        labels = sorted(self.sums)
        totals = [self.sums[k] for k in labels]
        groups = float(len(self.groups))
        if torch.distributed.is_available() and torch.distributed.is_initialized() and labels:
            t = torch.tensor([*totals, groups], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            totals = t[:-1].tolist()
            if not shares:  # evaluation: every process's batches are whole; average over all of them
                groups = float(t[-1])
        self.sums, self.groups, self.calls = {}, set(), 0
        monitor = self.pop_monitor(prefix)
        if not groups:
            return monitor
        logs = {f"{prefix}loss/{k}": v / groups for k, v in zip(labels, totals)}
        logs.update({f"{prefix}weight/{k}": w for k, w in self.weights.items()})
        logs.update(monitor)
        return logs

    def pop_monitor(self, prefix: str = "") -> dict[str, float]:
        """The monitor means since the last pop as ``{prefix}NAME`` (collective, like :meth:`pop`)."""
        names = sorted(self.monitor_sums)
        sums = [self.monitor_sums[k] for k in names]
        counts = [self.monitor_counts[k] for k in names]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and names:
            t = torch.tensor([*sums, *counts], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            sums, counts = t[: len(names)].tolist(), t[len(names) :].tolist()
        self.monitor_sums, self.monitor_counts = {}, {}
        return {f"{prefix}{k}": s / c for k, s, c in zip(names, sums, counts) if c}


def reference_params(model: torch.nn.Module | None, composite: CompositeLoss) -> dict[str, torch.Tensor] | None:
    """Detached copies of every trainable parameter before training: the anchor of ``l2_sp``
    terms (which select trainable parameters only; under LoRA the frozen base is not copied)."""
    if model is None or not any(t.name == "l2_sp" for t in composite.terms):
        return None
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class LossAdapter:
    """A task's composite loss for the Trainer, the same for every task.

    ``forward``: the task's :data:`TaskForward`. ``model``: the unwrapped model, given to
    regularisers (``l2``, ``l2_sp``, whose anchor is copied here). ``shifts_labels``: the batch's
    ``labels`` are next-token labels that the forward shifts (causal LMs), so the Trainer counts
    ``num_items_in_batch`` over ``labels[..., 1:]``. ``from_outputs``: for use as a plain
    ``Trainer``'s ``compute_loss_func`` (``adapter(outputs, labels, num_items_in_batch)``).

    Set by the Trainer side (:class:`~losslab.train.trainer.LosslabTrainer`,
    :class:`~losslab.train.trainer.LossTermsCallback`): :attr:`step` (weight schedules),
    :attr:`per_batch_scale` (1 / (micro-batches of the step x processes): per-batch terms count
    once per optimizer step), :attr:`num_pairs` (adjacent trained positions in the step, the
    ``consistency`` term's denominator) and :attr:`num_sequences` (rows with a trained target in the
    step, the ``sequence`` reduction's denominator).

    With ``num_items_in_batch`` (training), item-level terms are ``sum / global count``, so
    micro-batches and processes add up exactly; evaluation batches are normalised on their own.
    """

    def __init__(
        self,
        composite: CompositeLoss,
        forward: TaskForward,
        *,
        model: torch.nn.Module | None = None,
        shifts_labels: bool = False,
        from_outputs: OutputsToInputs | None = None,
    ) -> None:
        self.composite = composite
        self.forward = forward
        self.model = model
        self.shifts_labels = shifts_labels
        self.from_outputs = from_outputs
        self.reference_params = reference_params(model, composite)
        self.step = 0
        self.per_batch_scale = 1.0
        self.num_sequences: Any = None
        self.num_pairs: Any = None
        self.train_terms = TermAverager()
        self.eval_terms = TermAverager()
        self.last: CompositeOutput | None = None

    def compute_loss(
        self, model: torch.nn.Module, batch: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """The loss of one batch: the task's forward on ``model``, then :meth:`evaluate`."""
        return self.evaluate(self.forward(model, batch), num_items_in_batch, training=model.training)

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        """``compute_loss_func(outputs, labels, num_items_in_batch)`` of a plain ``Trainer``."""
        if self.from_outputs is None:
            raise TypeError(
                "this loss runs its own forward: use LosslabTrainer (or adapter.compute_loss(model, batch))"
            )
        training = self.model.training if self.model is not None else torch.is_grad_enabled()
        return self.evaluate(self.from_outputs(outputs, labels), num_items_in_batch, training=training)

    def evaluate(self, inputs: LossInputs, num_items_in_batch: Any = None, *, training: bool) -> torch.Tensor:
        """The composite's total on ``inputs`` (the batch fields) at :attr:`step`; records every term."""
        counted = training and num_items_in_batch is not None
        inputs.num_items = num_items_in_batch  # the global count of trained tokens / items
        inputs.num_examples = num_items_in_batch
        inputs.num_sequences = self.num_sequences if counted else None  # without it, `sequence` is a per-batch mean
        inputs.num_pairs = self.num_pairs if counted else None  # likewise for `consistency`
        inputs.model = self.model
        inputs.reference_params = self.reference_params
        out = self.composite(inputs, self.step, self.per_batch_scale if counted else 1.0)
        self.last = out
        averager = self.train_terms if training else self.eval_terms
        averager.add(out, group=self.step if training else None)
        if inputs.monitor:
            averager.add_monitor(inputs.monitor)
        return out.total
