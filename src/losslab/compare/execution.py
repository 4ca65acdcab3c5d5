"""Where the runs of a study execute: one after the other in this process (``sequential``), in N
local worker processes (``processes``), or as tasks on a Ray cluster (``ray``). The study's
``execution:`` section (and ``losslab compare --backend/--workers/--ray-address``) chooses.

Every executor gives the same per-run results: a job is a picklable zero-argument callable that
writes everything it produces under its own folder (a run or a tuning worker), and finishes
what an earlier, killed attempt left (runs resume from their last checkpoint). A run's torch
thread count is part of its result on real models (a reduction split over more threads adds
in another order), so it is fixed by the study, not by the executor: :func:`threads_per_run`.

What each backend does when a worker dies, and the checks made before any job starts:
docs/scaling.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from losslab.compare.jobs import (
    Execution,
    Job,
    Progress,
    Resources,
    threads_per_run,
    torch_threads,
    usable_cores,
)

__all__ = [
    "Execution",
    "Job",
    "Resources",
    "check_execution",
    "release",
    "run_jobs",
    "threads_per_run",
    "torch_threads",
    "usable_cores",
]


def check_execution(execution: Execution) -> None:
    """Refuse, before any job starts, an execution the machine or cluster cannot give: a missing
    Ray extra, an unreachable Ray address, more workers than cores or GPUs, a run larger than
    any Ray node. For ``ray`` this connects to the cluster (or starts the local one)."""
    if execution.backend == "processes":
        from losslab.compare.processes import check_processes

        check_processes(execution)
    elif execution.backend == "ray":
        from losslab.compare.raytasks import connect

        connect(execution)


def release(execution: Execution) -> None:
    """Stop what :func:`check_execution` started (the local Ray cluster, when losslab started it)."""
    if execution.backend == "ray":
        from losslab.compare.raytasks import disconnect

        disconnect()


def run_jobs(jobs: Sequence[Job], execution: Execution) -> None:
    """Run every job on the chosen backend and return once all are done; raises the first
    failure (after the other jobs have finished, so their results are kept)."""
    if not jobs:
        return
    if execution.backend == "processes":
        from losslab.compare.processes import run_processes

        run_processes(jobs, execution)
    elif execution.backend == "ray":
        from losslab.compare.raytasks import run_ray

        run_ray(jobs, execution)
    else:
        run_sequential(jobs)


def run_sequential(jobs: Sequence[Job]) -> None:
    progress = Progress(len(jobs), one_at_a_time=True)
    errors: list[BaseException] = []
    for job in jobs:
        progress.started(job.label)
        try:
            job.fn()
        except Exception as exc:  # noqa: BLE001  (the others still run; KeyboardInterrupt stops at once)
            progress.failed(job.label, exc)
            errors.append(exc)
        else:
            progress.finished(job.label)
    progress.close()
    if errors:
        raise errors[0]
