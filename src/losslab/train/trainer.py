"""The thin adapter between losslab's losses and ``transformers.Trainer``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import ModelOutput

from losslab.labels import IGNORE_INDEX
from losslab.train.adapter import LossAdapter
from losslab.train.guard import StepGuard


class LossTermsCallback(TrainerCallback):
    """Advances loss-weight schedules with ``global_step`` and puts every loss term into the
    Trainer's log (so TensorBoard or any other logger shows them)."""

    def __init__(self, loss_func: LossAdapter) -> None:
        self.loss_func = loss_func

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.loss_func.step = state.global_step

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.loss_func.step = state.global_step
        # the Trainer sums micro-batch losses over accumulation steps and, when the loss is
        # normalised by num_items_in_batch, over processes: per-batch terms get this share
        self.loss_func.per_batch_scale = 1.0 / (args.gradient_accumulation_steps * args.world_size)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kw: Any
    ) -> None:
        if logs is None:
            return
        prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
        if prefix:
            logs.update(self.loss_func.eval_terms.pop(prefix, shares=False))
        else:
            logs.update(self.loss_func.train_terms.pop(prefix))
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update({k: v for k, v in logs.items() if k not in state.log_history[-1]})


class WholeRunTrainLossCallback(TrainerCallback):
    """Makes the closing ``train_loss`` log the mean loss over every step of the run, after a resume too.

    On a resume the Trainer restarts its running loss total at 0 and divides by the steps since
    the restart; the steps before it are added back from the checkpoint's log history (each
    ``loss`` row is the mean over its logging interval). Exact with ``logging_steps: 1``; with
    larger intervals, the steps between the last log and the checkpoint are not in the history.
    Goes before :class:`JsonlLogCallback` in the callback list, so log.jsonl gets the whole-run value."""

    def __init__(self) -> None:
        self.resumed_at = 0
        self.resumed_total = 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.resumed_at, self.resumed_total, last = state.global_step, 0.0, 0.0
        for row in state.log_history:
            if "loss" in row and last < row.get("step", 0) <= self.resumed_at:
                self.resumed_total += row["loss"] * (row["step"] - last)
                last = row["step"]

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kw: Any
    ) -> None:
        if not logs or "train_loss" not in logs or not self.resumed_at or not state.global_step:
            return
        since = state.global_step - self.resumed_at
        logs["train_loss"] = (self.resumed_total + logs["train_loss"] * since) / state.global_step
        if state.log_history and "train_loss" in state.log_history[-1]:
            state.log_history[-1]["train_loss"] = logs["train_loss"]


class JsonlLogCallback(TrainerCallback):
    """Appends every log line (loss terms, learning rate, grad norm, eval metrics) to ``log.jsonl``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kw: Any
    ) -> None:
        if logs is None or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


# the mixin's methods use the Trainer's attributes; at run time it is a plain mixin
if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object


@dataclass
class LossOutput(ModelOutput):
    """What :meth:`LosslabLossMixin.compute_loss` returns as the outputs: nothing kept (the loss's
    forward may have asked the model for no logits); empty as a dict, ``logits`` None."""

    logits: torch.Tensor | None = None


class LosslabLossMixin(_TrainerBase):
    """The loss part of :class:`LosslabTrainer`, for any ``transformers.Trainer`` subclass
    (``class MyTrainer(LosslabLossMixin, SFTTrainer)``; :func:`losslab.integrations.losslab_trainer`).

    ``loss_func``: a :class:`~losslab.train.adapter.LossAdapter`. :meth:`compute_loss` runs the
    adapter's forward (the task's: token weights in the batch reach the loss, the fused head asks
    the model for no logits) and normalises by the Trainer's ``num_items_in_batch``;
    :meth:`get_batch_samples` gives the loss the step's trained rows (``num_sequences``, the
    ``sequence`` reduction's exact denominator) and the per-batch terms' share. It replaces the
    base class's ``compute_loss``: what that one adds (TRL's entropy and token-accuracy metrics)
    is not computed."""

    def __init__(self, *args: Any, loss_func: LossAdapter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_func = loss_func
        # as the Trainer's compute_loss_func, the Trainer counts num_items_in_batch and treats the loss
        # as normalised over the accumulated batch; set after __init__, where TRL 1.16's trainers warn
        # that the argument is deprecated (compute_loss below is what calls it, not theirs)
        self.compute_loss_func = loss_func
        if loss_func.shifts_labels:
            # the Trainer counts num_items_in_batch over labels[..., 1:] only for the model classes it
            # knows shift (`*ForCausalLM`); losslab shifts every causal LM's labels (GPT2LMHeadModel too)
            self._loss_shifts_labels = True
        # the Trainer puts report_to loggers (TensorBoard) before the given callbacks: the terms
        # must be in the log line before any logger reads it (a stable sort keeps the rest in order)
        self.callback_handler.callbacks.sort(key=lambda cb: not isinstance(cb, LossTermsCallback))

    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns keeps the model's forward arguments (TRL's: input_ids, labels,
        # seq_lengths); the loss's forward also reads the token weights
        super()._set_signature_columns_if_needed()
        columns: list[str] = list(getattr(self, "_signature_columns", None) or [])
        if "weights" not in columns:
            # (Trainer declares the attribute as None)
            self._signature_columns = [*columns, "weights"]  # type: ignore[assignment]

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The micro-batches of one optimizer step and ``num_items_in_batch``, after the task's
        forward has rewritten them where it does (``prepare_training_batch(model, batch)``: the
        distill task's on-policy completions); also gives the loss function ``num_sequences`` (the
        rows with a trained target in the step, over every process: the ``sequence`` reduction's
        exact denominator under accumulation and DDP) and ``num_pairs`` (the adjacent trained
        positions: the ``consistency`` term's)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        prepare = getattr(self.loss_func.forward, "prepare_training_batch", None)
        if prepare is not None:
            # batches the forward rewrites (distill's on-policy completions) are counted as rewritten
            prepared = [prepare(self.model, batch) for batch in batch_samples]
            if any(new is not old for new, old in zip(prepared, batch_samples)):
                batch_samples = prepared
                num_items_in_batch = self._get_num_items_in_batch(batch_samples, device)
        # per-batch terms (regularisers) count once per optimizer step, also in an epoch's last,
        # shorter accumulation window
        self.loss_func.per_batch_scale = 1.0 / (max(1, len(batch_samples)) * self.args.world_size)
        counts = self._step_counts(batch_samples, device) if num_items_in_batch is not None else None
        self.loss_func.num_sequences, self.loss_func.num_pairs = counts if counts is not None else (None, None)
        return batch_samples, num_items_in_batch

    def _step_counts(self, batch_samples: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Over the step's micro-batches and processes, from ``labels`` (shifted like
        ``num_items_in_batch``; -100 = not trained): the rows with a trained target, and the
        pairs of adjacent trained positions (what the ``consistency`` term averages over)."""
        rows = [
            b["shift_labels"]
            if "shift_labels" in b
            else b["labels"][..., 1:]
            if self._loss_shifts_labels
            else b["labels"]
            for b in batch_samples
            if isinstance(b.get("labels", b.get("shift_labels")), torch.Tensor)
        ]
        if not rows or any(r.dim() < 2 for r in rows):
            return None
        trained = [r.ne(IGNORE_INDEX) for r in rows]
        count = torch.stack(
            [
                sum(t.any(dim=-1).sum() for t in trained),
                sum((t[..., :-1] & t[..., 1:]).sum() for t in trained),
            ]
        ).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count.unsqueeze(0)).sum(dim=0)
        return count[0], count[1]

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if not model.training:
            # evaluation: the Trainer passes the batch's item count summed over processes (and would
            # multiply the loss by their number); each evaluation batch is normalised on its own
            num_items_in_batch = None
        loss = self.loss_func.compute_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # DDP averages gradients over processes, and each loss is over the global count
            # (the Trainer's own rule for a compute_loss_func)
            loss = loss * (
                self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
            )
        return (loss, LossOutput()) if return_outputs else loss


class LosslabTrainer(StepGuard, LosslabLossMixin, Trainer):
    """``Trainer`` whose loss is a :class:`~losslab.train.adapter.LossAdapter`: the task's forward
    on each batch (token weights, the fused head's hidden states, pairs, triplets), normalised by
    the Trainer's ``num_items_in_batch`` and the step's trained rows (:class:`LosslabLossMixin`).

    :class:`~losslab.train.guard.StepGuard` adds the numerics and fault handling: non-finite
    steps skipped and counted (``max_nonfinite_steps=``), checkpoints with a completion marker,
    stop on request (``stop_requested``)."""
