"""What the executors of :mod:`losslab.compare.execution` share: the study's ``execution:``
section (:class:`Execution`), a unit of work (:class:`Job`), the thread count of a run
(:func:`threads_per_run`) and the progress lines.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cpus: float | None = Field(
        None,
        gt=0,
        description="CPU cores per run, and its torch threads, in every backend (default: the machine's cores / "
        "workers; ray: 1); set it to get bit-identical runs across different worker counts",
    )
    gpus: float = Field(
        0, ge=0, le=1, description="GPUs per run (processes: one GPU per worker, or a share of one for a fraction)"
    )


class Execution(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    backend: Literal["sequential", "processes", "ray"] = Field(
        "sequential", description="sequential (this process), processes (N local workers) or ray (tasks on a cluster)"
    )
    workers: int | None = Field(
        None, ge=1, description="processes: worker processes (default: 1); ray: runs at once (default: what fits)"
    )
    ray_address: str | None = Field(
        None, description="ray: the cluster to join (ray://host:10001 or host:6379); default: a local cluster"
    )
    resources_per_run: Resources = Field(default_factory=Resources)
    max_retries: int = Field(2, ge=0, description="times a run whose worker died is started again (it resumes)")


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn()`` must be picklable and idempotent (rerunning a finished or
    half-finished job finishes it without redoing what is done). ``label`` names it in progress
    lines and errors."""

    label: str
    fn: Callable[[], None]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a SLURM or container limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        return os.cpu_count() or 1


def threads_per_run(execution: Execution) -> int:
    """The torch thread count of every run: ``resources_per_run.cpus`` (rounded down, at least 1)
    when given; else ray: 1 (Ray's default task size), sequential and processes: this machine's
    cores / ``workers``. The same for every backend at the same settings, so a run gives the same
    bits whichever executor trains it (``sequential`` with ``workers: 2`` trains one run at a time
    on half the cores, exactly as each of 2 ``processes`` workers does)."""
    cpus = execution.resources_per_run.cpus
    if cpus is not None:
        return max(1, int(cpus))
    if execution.backend == "ray":
        return 1
    return max(1, usable_cores() // (execution.workers or 1))


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Within the block torch uses ``threads`` intra-op threads (None: unchanged); restored after."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Progress:
    """Progress lines of a batch of jobs: a bar, the count and (once one is done) the time left."""

    def __init__(self, total: int, *, one_at_a_time: bool = False) -> None:
        self.total = total
        self.done = 0
        self.begun = 0
        self.one_at_a_time = one_at_a_time
        self.start = time.monotonic()

    def started(self, label: str) -> None:
        self.begun += 1
        print(
            f"\n[{progress_bar(self.done, self.total)}] run {self.begun}/{self.total}: {label}{self.eta()}", flush=True
        )

    def finished(self, label: str) -> None:
        self.done += 1
        if not self.one_at_a_time:
            print(f"[{progress_bar(self.done, self.total)}] finished {self.done}/{self.total}: {label}", flush=True)

    def failed(self, label: str, exc: BaseException) -> None:
        self.done += 1
        print(f"[{progress_bar(self.done, self.total)}] FAILED: {label}: {exc}", flush=True)

    def retried(self, label: str, why: str, attempt: int, attempts: int) -> None:
        print(f"{label}: {why}; started again (attempt {attempt} of {attempts}, it resumes)", flush=True)

    def eta(self) -> str:
        if self.done == 0:
            return ""
        left = (time.monotonic() - self.start) / self.done * (self.total - self.done)
        return f" (about {left / 60:.1f} min left)"

    def close(self) -> None:
        elapsed = time.monotonic() - self.start
        print(f"[{progress_bar(self.done, self.total)}] {self.total} runs in {elapsed:.0f} s", flush=True)


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else width
    return "#" * filled + "." * (width - filled)


def gpu_share(gpus: float) -> int:
    """Workers per GPU for a per-run share ``gpus`` in (0, 1]: 1 / gpus, rounded down."""
    return max(1, math.floor(1 / gpus + 1e-9))
