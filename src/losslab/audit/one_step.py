"""One optimizer step of the real Trainer on a fixed batch: the loss it logs and every parameter's
gradient just before the optimizer would use it (:func:`trainer_step`), and the relative
differences between two such steps (:func:`step_difference`).

The step is the Trainer's own: its data loader, ``num_items_in_batch`` count, accumulation and (under
``torchrun``) its process group. losslab's loss runs in
:class:`~losslab.train.trainer.LosslabTrainer` (as ``losslab train`` does); a user's
``compute_loss_func(outputs, labels, num_items_in_batch=None)`` runs in a plain
``transformers.Trainer`` (with the loss's own ``callback()`` when it has one, as
:func:`losslab.integrations.loss_func`'s). The learning rate is 0 and gradient clipping is off, so the model is the
same after the step and the gradients are the raw ones.
"""

from __future__ import annotations

import gc
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from losslab.train.adapter import LossAdapter

Collator = Callable[[list[dict]], dict[str, Any]]
UserLoss = Callable[..., torch.Tensor]
"""A ``transformers.Trainer`` ``compute_loss_func``: ``(outputs, labels, num_items_in_batch=None) -> loss``."""


@dataclass
class Step:
    """One optimizer step: ``loss`` as the Trainer logs it (summed over the step's micro-batches,
    averaged over processes) and ``grads``: parameter name -> gradient (a CPU copy), before clipping."""

    loss: float
    grads: dict[str, torch.Tensor]

    @property
    def grad_norm(self) -> float:
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in self.grads.values()))


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Sets every dropout probability of ``model`` to 0 (``nn.Dropout`` modules and the float
    ``attention_dropout``/``dropout`` attributes of attention layers), so that one batch split in
    different ways sees the same network. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def drop_keys(collator: Collator, keys: Sequence[str]) -> Collator:
    """``collator`` without the batch keys ``keys`` (e.g. losslab's ``weights``, which a model's
    forward does not take)."""

    def collate(samples: list[dict]) -> dict[str, Any]:
        return {k: v for k, v in collator(samples).items() if k not in keys}

    return collate


def trainer_step(
    model: torch.nn.Module,
    samples: list[dict],
    collator: Collator,
    loss: LossAdapter | UserLoss,
    *,
    batch_size: int,
    grad_accum: int = 1,
    seed: int = 0,
) -> Step:
    """One step of the Trainer over ``samples`` (all of them: ``len(samples)`` must be
    ``batch_size x grad_accum x processes``). ``loss``: losslab's adapter (run by
    ``LosslabTrainer``) or a user's ``compute_loss_func`` (run by a plain ``Trainer``). The model's
    parameters are unchanged afterwards (learning rate 0); its gradients are cleared."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from losslab.train.trainer import LosslabTrainer, LossTermsCallback

    grads: dict[str, torch.Tensor] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    grads[name] = (
                        p.grad.detach().cpu().clone() if p.grad is not None else torch.zeros_like(p, device="cpu")
                    )

    model.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory(prefix="losslab-audit-") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum,
            max_steps=1,
            learning_rate=0.0,
            weight_decay=0.0,
            max_grad_norm=0.0,  # the callback sees the gradients after clipping: no clipping
            lr_scheduler_type="constant",
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            seed=seed,
            data_seed=seed,
        )
        trainer: Trainer
        if isinstance(loss, LossAdapter) and loss.from_outputs is None:  # the adapter runs its own forward
            trainer = LosslabTrainer(
                model=model,
                args=args,
                train_dataset=samples,
                data_collator=collator,
                loss_func=loss,
                callbacks=[LossTermsCallback(loss), Capture()],
            )
        else:
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=samples,
                data_collator=drop_keys(collator, ("weights",)),
                compute_loss_func=loss,
                # losslab's integration loss (losslab.integrations.loss_func) comes with its callback
                callbacks=[Capture(), *([callback()] if callable(callback := getattr(loss, "callback", None)) else [])],
            )
        trainer.remove_callback(PrinterCallback)  # (the step's log line is not the audit's output)
        # the Trainer ends with accelerate's gc.collect() over every object of the process (most of a
        # tiny model's step); frozen objects are skipped, and unfrozen again afterwards (nothing leaks)
        gc.freeze()
        try:
            trainer.train()
        finally:
            gc.unfreeze()
        logged = next(row["loss"] for row in trainer.state.log_history if "loss" in row)
    model.zero_grad(set_to_none=True)
    return Step(float(logged), grads)


@dataclass(frozen=True)
class Difference:
    """How far a step is from the reference step. ``loss``: |loss - ref| / |ref|; ``grad_norm``:
    the same for the gradient norms; ``grad``: ||g - g_ref|| / ||g_ref|| over all parameters;
    ``grad_max``: the largest of that ratio per parameter tensor (a tensor whose reference gradient
    is below 1e-8 of the whole norm is measured against the whole norm)."""

    loss: float
    grad_norm: float
    grad: float
    grad_max: float
    worst_param: str

    def largest(self) -> float:
        return max(self.loss, self.grad_norm, self.grad_max)


def relative(a: float, ref: float) -> float:
    if a == ref:
        return 0.0
    return abs(a - ref) / abs(ref) if ref else math.inf


def step_difference(step: Step, ref: Step) -> Difference:
    """The relative differences of ``step`` from ``ref`` (computed in float64)."""
    total = ref.grad_norm
    diff_sq = 0.0
    worst, worst_name = 0.0, ""
    for name, g_ref in ref.grads.items():
        g_ref64 = g_ref.double()
        delta = float((step.grads[name].double() - g_ref64).norm())
        diff_sq += delta**2
        scale = max(float(g_ref64.norm()), 1e-8 * total)
        ratio = delta / scale if scale else (math.inf if delta else 0.0)
        if ratio > worst:
            worst, worst_name = ratio, name
    return Difference(
        loss=relative(step.loss, ref.loss),
        grad_norm=relative(step.grad_norm, total),
        grad=math.sqrt(diff_sq) / total if total else (math.inf if diff_sq else 0.0),
        grad_max=worst,
        worst_param=worst_name,
    )
