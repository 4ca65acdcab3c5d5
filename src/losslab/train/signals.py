"""SIGINT and SIGTERM as a stop request: the run finishes its step, saves and stops; data-loader
workers leave both signals to the main process (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol


class StopRequests(Protocol):
    """What receives a stop request (:class:`~losslab.train.guard.StepGuard`)."""

    stop_requested: bool
    stop_signal: int | None


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM after saving a checkpoint; rerunning the command resumes it.
    ``exit_status``: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports it."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_status = 128 + int(signum)


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


def workers_leave_stop_signals(loader: Any) -> Any:
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
def stop_on_signals(trainer: StopRequests) -> Iterator[None]:
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
