"""Where the runs of a study execute: one after the other in this process (``sequential``), in N
local worker processes (``processes``), or as tasks on a Ray cluster (``ray``). The study's
``execution:`` section (and ``losslab compare --backend/--workers/--ray-address``) chooses.

Every executor gives the same per-run results: a job is a picklable zero-argument callable that
writes everything it produces under its own folder (a run or a tuning worker), and finishes
what an earlier, killed attempt left (runs resume from their last checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cpus: float | None = Field(
        None, gt=0, description="CPU cores per run (default: the machine's cores / workers; torch threads follow)"
    )
    gpus: float = Field(0, ge=0, description="GPUs per run (processes: one GPU per worker when > 0)")


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


def run_jobs(jobs: Sequence[Job], execution: Execution) -> None:
    """Run every job on the chosen backend and return once all are done; raises the first
    failure (after the other jobs have finished, so their results are kept)."""
    if execution.backend != "sequential":
        raise NotImplementedError(f"execution backend {execution.backend!r}")
    for job in jobs:
        job.fn()
