"""The Trainer's step guard (:class:`StepGuard`): non-finite steps skipped and counted, checkpoints
saved complete (:mod:`losslab.train.checkpoints`), stop requests honoured at the end of a step
(:mod:`losslab.train.signals`). docs/reliability.md explains each mechanism."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from losslab.errors import UserError
from losslab.train.checkpoints import (
    COMPLETE_MARKER,
    checkpoints,
    fsync_tree,
    is_complete,
    last_complete_checkpoint,
    mark_complete,
    read_marker,
    rotate_checkpoints,
)
from losslab.train.signals import workers_leave_stop_signals


class TrainingDiverged(UserError):
    """Too many non-finite steps, or non-finite weights: the run stops (CLI exit status 2)."""


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def any_process(flags: torch.Tensor) -> list[bool]:
    """Element-wise OR of a vector of flags over every process (one all-reduce)."""
    flags = flags.float()
    if _distributed():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in flags.tolist()]


def weights_finite(model: torch.nn.Module) -> bool:
    """True when every parameter is finite on every process."""
    bad = any(not bool(torch.isfinite(p.detach()).all()) for p in model.parameters())
    device = next(model.parameters()).device
    return not any_process(torch.tensor([bad], device=device))[0]


# ---- the Trainer mixin ------------------------------------------------------------------------


class _StopAfterStep(TrainerCallback):
    """Saves and stops at the end of a step when every process agreed on a stop request."""

    def __init__(self, trainer: StepGuard) -> None:
        self.trainer = trainer

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.trainer.stopping:
            control.should_save = True
            control.should_training_stop = True


class StepGuard:
    """Mixin for a ``transformers.Trainer`` subclass: skips and counts non-finite optimizer
    steps, writes checkpoints with a completion marker, stops cleanly on request (SIGINT, SIGTERM).
    See the module docstring. ``max_nonfinite_steps``: the run stops at the N-th skipped step.

    Attributes: ``nonfinite_steps`` (the skipped steps, 1-based like the log's ``step``; kept
    across resume in the checkpoint marker), ``stop_requested`` (set it, e.g. from a signal
    handler, to stop after the current step), ``stop_signal`` (the signal that asked, if any),
    ``stopping`` (True once every process agreed).
    """

    def __init__(self, *args: Any, max_nonfinite_steps: int = 5, **kwargs: Any) -> None:
        if max_nonfinite_steps < 1:
            raise ValueError("max_nonfinite_steps must be >= 1")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps: list[int] = []
        self.stop_requested = False
        self.stop_signal: int | None = None
        self.stopping = False
        self._loss_nonfinite: torch.Tensor | None = None
        super().__init__(*args, **kwargs)
        self.add_callback(_StopAfterStep(self))  # type: ignore[attr-defined]

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        # Resumed from a checkpoint at max_steps in mid-epoch (a run killed during its final
        # evaluation), Trainer 5.24 would run one step more than max_steps: none is left.
        state = self.state  # type: ignore[attr-defined]
        if 0 < state.max_steps <= state.global_step:
            self.control.should_training_stop = True  # type: ignore[attr-defined]
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]

    # The Trainer calls training_step per micro-batch, then _get_grad_norm once per optimizer
    # step, right before optimizer.step(): the place to decide.
    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_nonfinite = bad if self._loss_nonfinite is None else self._loss_nonfinite | bad
        return loss

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)  # type: ignore[misc]
        device = self.args.device  # type: ignore[attr-defined]
        bad = ~torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32, device=device)).reshape(())
        if self._loss_nonfinite is not None:
            bad = bad | self._loss_nonfinite.to(device)
        self._loss_nonfinite = None
        nonfinite, stop = any_process(torch.stack([bad, torch.tensor(self.stop_requested, device=device)]))
        self.stopping = self.stopping or stop
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)  # type: ignore[attr-defined]  # step() then skips every parameter
            self._count_nonfinite()
        return grad_norm

    def _count_nonfinite(self) -> None:
        state = self.state  # type: ignore[attr-defined]
        step = state.global_step + 1
        self.nonfinite_steps.append(step)
        n, limit = len(self.nonfinite_steps), self.max_nonfinite_steps
        if state.is_world_process_zero:
            print(f"step {step}: non-finite loss or gradient; update skipped ({n} of at most {limit})", flush=True)
        if n >= limit:
            last = last_complete_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
            raise TrainingDiverged(
                f"training stopped at step {step}: {n} steps had a non-finite loss or gradient "
                f"(steps {', '.join(map(str, self.nonfinite_steps))}; no update was applied at those steps). "
                f"Last good checkpoint: {last or 'none'}. Lower training.lr, set training.max_grad_norm, "
                f"use dtype float32, or raise the limit",
                where="training.max_nonfinite_steps",
            )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs or "train_loss" in logs:
            logs["nonfinite_steps"] = len(self.nonfinite_steps)
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        state, args = self.state, self.args  # type: ignore[attr-defined]
        if not weights_finite(self.model):  # type: ignore[attr-defined]
            raise TrainingDiverged(
                f"the weights are non-finite at step {state.global_step}: checkpoint not saved; last good checkpoint: "
                f"{last_complete_checkpoint(args.output_dir) or 'none'}",
                where="training",
            )
        limit = args.save_total_limit
        args.save_total_limit = None  # the Trainer would rotate before the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            args.save_total_limit = limit
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{state.global_step}"  # type: ignore[attr-defined]
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]  # every process wrote its part (RNG states)
        if args.should_save:
            mark_complete(folder, {"step": state.global_step, "nonfinite_steps": self.nonfinite_steps})
            rotate_checkpoints(folder.parent, limit, state.best_model_checkpoint)

    def _finalize_training(self, trial: Any, *rest: Any, **kwargs: Any) -> Any:
        """The Trainer's end of training. At ``save_total_limit: 1`` with a best model it deletes
        every checkpoint but the best one: after Ctrl-C that would delete the checkpoint a rerun
        resumes from, so then nothing is deleted; otherwise each loses its marker first."""
        args, state = self.args, self.state  # type: ignore[attr-defined]
        limit = args.save_total_limit
        args.save_total_limit = None
        try:
            result = super()._finalize_training(trial, *rest, **kwargs)  # type: ignore[misc]
        finally:
            args.save_total_limit = limit
        best = state.best_model_checkpoint
        if limit == 1 and best and args.should_save and not (self.stopping or self.stop_requested):
            for _, path in checkpoints(self._get_output_dir(trial=trial)):  # type: ignore[attr-defined]
                if path.resolve() != Path(best).resolve():
                    (path / COMPLETE_MARKER).unlink(missing_ok=True)
                    shutil.rmtree(path, ignore_errors=True)
        return result

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the last *complete* checkpoint,
        and a named checkpoint must be complete."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
            if resume_from_checkpoint is None:
                raise UserError(f"no complete checkpoint to resume from in {self.args.output_dir}")  # type: ignore[attr-defined]
        if resume_from_checkpoint:
            if not is_complete(resume_from_checkpoint):
                raise UserError(
                    f"checkpoint {resume_from_checkpoint} is incomplete (no {COMPLETE_MARKER}: its save was "
                    "interrupted); delete it to resume from the one before"
                )
            self.nonfinite_steps = list(read_marker(resume_from_checkpoint).get("nonfinite_steps", []))
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def get_train_dataloader(self) -> Any:
        return workers_leave_stop_signals(super().get_train_dataloader())  # type: ignore[misc]

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        return workers_leave_stop_signals(super().get_eval_dataloader(eval_dataset))  # type: ignore[misc]

    def get_test_dataloader(self, test_dataset: Any) -> Any:
        return workers_leave_stop_signals(super().get_test_dataloader(test_dataset))  # type: ignore[misc]

    def stop_if_requested_late(self) -> None:
        """After ``train()``: a stop asked for after the last step's check (on any process) still
        stops the run, before any evaluation; training is complete and its final checkpoint saved."""
        if not self.stopping:
            self.stopping = any_process(torch.tensor([self.stop_requested], device=self.args.device))[0]  # type: ignore[attr-defined]

    def save_model_atomic(self, output_dir: str | os.PathLike[str]) -> None:
        """``save_model`` into a temporary folder next to ``output_dir``, then renamed into place
        (non-finite weights are refused)."""
        target = Path(output_dir)
        if not weights_finite(self.model):  # type: ignore[attr-defined]
            raise TrainingDiverged("the final weights are non-finite: model not saved", where="training")
        tmp = target.with_name(f".{target.name}.tmp")
        if self.is_world_process_zero():  # type: ignore[attr-defined]
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]
        self.save_model(str(tmp))  # type: ignore[attr-defined]
        self.accelerator.wait_for_everyone()  # type: ignore[attr-defined]
        if self.is_world_process_zero():  # type: ignore[attr-defined]
            fsync_tree(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
