"""Numerics and faults on the ``transformers.Trainer``: non-finite steps, complete checkpoints, SIGINT/SIGTERM.

:class:`StepGuard` is a mixin for a ``Trainer`` subclass
(:class:`~losslab.train.trainer.LosslabTrainer` uses it):

- **Non-finite steps.** Each optimizer step, the micro-batch losses and the gradient norm are
  checked; when any is NaN or infinite (on any process: the flag is all-reduced, so every
  process takes the same decision) the gradients are dropped (``set_to_none``) before
  ``optimizer.step()``, which then changes neither the parameters nor the optimizer state.
  The step still counts (data consumed, ``global_step`` and the learning-rate schedule move
  on). The steps are counted and logged; at ``max_nonfinite_steps`` such steps the run stops
  with :class:`TrainingDiverged`. A checkpoint or model whose weights are non-finite is never
  written.
- **Complete checkpoints.** ``transformers`` writes ``checkpoint-N`` in place and its
  ``get_last_checkpoint`` picks the highest N, finished or not: a kill during a save leaves a
  folder that resume picks and then fails on (or loads half of). Here a checkpoint is
  complete only once :data:`COMPLETE_MARKER` is written into it, last, after every file is
  fsynced and every process is done; older checkpoints are rotated out only after that (their
  marker removed first). :func:`last_complete_checkpoint` ignores unmarked folders and
  :func:`remove_incomplete_checkpoints` deletes them before a resume.
  (A temporary folder renamed into place would need the Trainer to save elsewhere than
  ``output_dir/checkpoint-N``, which it does not allow without re-implementing its save.)
- **SIGINT, SIGTERM.** :func:`stop_on_signals` turns the first Ctrl-C or SIGTERM (a cluster's
  preemption or time limit, a launcher's shutdown) into a request: the Trainer finishes the
  current optimizer step, saves a checkpoint and stops (all processes agree, through the same
  all-reduce); the same request reaching a process twice (from a launcher and from a cluster
  that signals every process of a job) is recognised, and a second Ctrl-C later interrupts at
  once. Data-loader workers leave both signals to the main process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from losslab.errors import UserError
from losslab.files import write_atomic

COMPLETE_MARKER = "losslab_checkpoint.json"
"""Written last into ``checkpoint-N``: ``{"step": N, "nonfinite_steps": [...]}``."""

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class TrainingDiverged(UserError):
    """Too many non-finite steps, or non-finite weights: the run stops (CLI exit status 2)."""


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM after saving a checkpoint; rerunning the command resumes it.
    ``exit_status``: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports it."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_status = 128 + int(signum)


# ---- checkpoints ------------------------------------------------------------------------------


def checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-N`` folder, complete or not, by step."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def is_complete(checkpoint: str | os.PathLike[str]) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def last_complete_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The complete checkpoint with the highest step (None when there is none)."""
    done = [p for _, p in checkpoints(output_dir) if is_complete(p)]
    return str(done[-1]) if done else None


def remove_incomplete_checkpoints(output_dir: str | os.PathLike[str]) -> list[str]:
    """Delete the ``checkpoint-N`` folders a killed save left unfinished; returns their paths.
    Call it on one process only, before training."""
    removed = []
    for _, path in checkpoints(output_dir):
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def read_marker(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text(encoding="utf-8"))


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` (and the folder entries) to disk."""
    for path in [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def mark_complete(checkpoint: Path, info: dict[str, Any]) -> None:
    """Flush ``checkpoint`` and write its marker (temp file + rename), then flush the folder."""
    _fsync_tree(checkpoint)
    write_atomic(checkpoint / COMPLETE_MARKER, json.dumps(info) + "\n")
    _fsync_tree(checkpoint)


def rotate_checkpoints(output_dir: str | os.PathLike[str], keep: int | None, protect: str | None = None) -> None:
    """Delete the oldest complete checkpoints beyond ``keep`` (the newest one and ``protect``,
    the best model's, always stay). Each loses its marker first, so a kill during the deletion
    leaves an incomplete folder, never a half-deleted one that looks complete."""
    if not keep or keep <= 0:
        return
    done = [p for _, p in checkpoints(output_dir) if is_complete(p)]
    protected = {done[-1].resolve()} if done else set()
    if protect:
        protected.add(Path(protect).resolve())
    excess = len(done) - max(keep, len(protected))
    for path in done:
        if excess <= 0:
            break
        if path.resolve() in protected:
            continue
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        excess -= 1


def keep_log_rows(log: str | os.PathLike[str], checkpoint: str | None) -> None:
    """Make ``log.jsonl`` hold exactly the rows written before ``checkpoint`` was saved (its
    ``trainer_state.json`` log history has one entry per row), or none for a fresh start:
    rows of steps a killed run did after its last checkpoint, and a torn last line, go.
    Rewritten with a temp file + rename."""
    path = Path(log)
    if not path.is_file():
        return
    keep = 0
    if checkpoint is not None:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        keep = len(state.get("log_history", []))
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[:keep]:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        rows.append(line + "\n")
    write_atomic(path, "".join(rows))


# ---- processes --------------------------------------------------------------------------------


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


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
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
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
                f"use dtype float32, or raise the limit", where="training.max_nonfinite_steps")

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs or "train_loss" in logs:
            logs["nonfinite_steps"] = len(self.nonfinite_steps)
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        state, args = self.state, self.args  # type: ignore[attr-defined]
        if not weights_finite(self.model):  # type: ignore[attr-defined]
            raise TrainingDiverged(
                f"the weights are non-finite at step {state.global_step}: checkpoint not saved; last good checkpoint: "
                f"{last_complete_checkpoint(args.output_dir) or 'none'}", where="training")
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
                raise UserError(f"checkpoint {resume_from_checkpoint} is incomplete (no {COMPLETE_MARKER}: its save was "
                                "interrupted); delete it to resume from the one before")
            self.nonfinite_steps = list(read_marker(resume_from_checkpoint).get("nonfinite_steps", []))
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def get_train_dataloader(self) -> Any:
        return _workers_leave_stop_signals(super().get_train_dataloader())  # type: ignore[misc]

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        return _workers_leave_stop_signals(super().get_eval_dataloader(eval_dataset))  # type: ignore[misc]

    def get_test_dataloader(self, test_dataset: Any) -> Any:
        return _workers_leave_stop_signals(super().get_test_dataloader(test_dataset))  # type: ignore[misc]

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
            _fsync_tree(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)


class WorkerIgnoresStopSignals:
    """A data loader's ``worker_init_fn`` (wrapping the one it had): the worker ignores SIGINT and
    SIGTERM, which a terminal, a cluster or ``killpg`` also send to it, and keeps serving batches
    until the main process has saved and stops it. Without it a worker dies on SIGTERM (PyTorch's
    handler), or on SIGINT when not forked, and the run ends with "DataLoader worker exited
    unexpectedly" and no checkpoint. A signal that reaches a worker before this runs still ends
    it: a spawned worker's first second, while Python starts; for a forked worker, a SIGTERM in
    the moment between PyTorch's worker handler and this."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def _workers_leave_stop_signals(loader: Any) -> Any:
    base = getattr(loader, "base_dataloader", loader)  # accelerate's adapters iterate the DataLoader they wrap
    if getattr(base, "num_workers", 0) and not isinstance(base.worker_init_fn, WorkerIgnoresStopSignals):
        base.worker_init_fn = WorkerIgnoresStopSignals(base.worker_init_fn)
    return loader


# Two deliveries of one stop request: a launcher forwards the signal to its workers, and a cluster
# (SLURM) or a terminal may signal the worker directly as well. Python runs a handler only when
# the main thread is back from C code (a backward pass, a collective), possibly seconds after the
# signal arrived, so the time between two handler calls says little. Without a launcher a repeat
# within REPEAT_AFTER_S is still taken as the same request; under a launcher the second signal
# never means "stop at once", only a third does (the launcher's own shutdown timeout also ends it).
REPEAT_AFTER_S = 1.0


def _under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


@contextlib.contextmanager
def stop_on_signals(trainer: StepGuard) -> Iterator[None]:
    """Within the block, the first SIGINT or SIGTERM asks ``trainer`` to stop after the current
    step (with a checkpoint; every process agrees on the step; ``trainer.stop_signal`` records
    which). A later one raises ``KeyboardInterrupt`` at once: without a launcher, a repeat more
    than ``REPEAT_AFTER_S`` after the first; under torchrun / accelerate launch, the third signal.
    The handlers before the block are restored after it. Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[float] = []
    owner = os.getpid()
    launcher = _under_launcher()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked data-loader worker before its worker_init_fn: not its business
            return
        now = time.monotonic()
        seen.append(now)
        if len(seen) == 1:
            trainer.stop_requested = True
            trainer.stop_signal = signum
            if os.environ.get("RANK", "0") == "0":
                name = signal.Signals(signum).name
                again = "" if launcher else " (Ctrl-C again to stop at once)"
                print(f"\nlosslab: {name}: stopping after this step with a checkpoint{again}", flush=True)
        elif (len(seen) >= 3) if launcher else (now - seen[0] > REPEAT_AFTER_S):
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, signal.SIG_DFL if before is None else before)  # None: a handler set outside Python
