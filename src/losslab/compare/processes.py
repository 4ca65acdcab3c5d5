"""The ``processes`` backend: N local worker processes (spawned, so no state is inherited from
this one), each with its share of the cores (torch threads and ``OMP_NUM_THREADS``) or one GPU
(``CUDA_VISIBLE_DEVICES``; ``gpus: 0.5`` puts two workers on each GPU).

Each worker takes one job at a time through a pipe and answers with its outcome. A worker that
dies in a job (SIGKILL, out of memory) is replaced and the job is started again, up to
``max_retries`` times: a run resumes from its last checkpoint. A job that raises is not retried
(the same config would fail the same way); the other jobs still finish, then its error is raised.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from losslab.compare.jobs import Execution, Job, Progress, gpu_share, threads_per_run, usable_cores
from losslab.errors import UserError

STOP_WAIT_S = 120  # on Ctrl-C: how long workers get to save a checkpoint and stop


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def check_processes(execution: Execution) -> None:
    """More workers than the cores (or than cores / ``cpus`` per run), or than the visible GPUs
    when runs need one: a UserError before any job starts."""
    workers = execution.workers or 1
    cores = usable_cores()
    cpus = execution.resources_per_run.cpus
    if cpus is None and workers > cores:  # (with cpus set, the check below is the one that counts)
        raise UserError(
            f"field 'execution.workers': {workers} worker processes, but this machine gives {cores} CPU cores; "
            f"use at most {cores}"
        )
    if cpus is not None and workers * cpus > cores:
        raise UserError(
            f"field 'execution.resources_per_run.cpus': {workers} workers x {cpus:g} cores = {workers * cpus:g}, "
            f"but this machine gives {cores}"
        )
    gpus = execution.resources_per_run.gpus
    if gpus > 0:
        visible = visible_gpus()
        fits = len(visible) * gpu_share(gpus)
        if workers > fits:
            raise UserError(
                f"field 'execution.workers': {workers} workers with {gpus:g} GPU each, but {len(visible)} GPU(s) "
                f"are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                f"at most {fits} workers"
            )


def worker_main(conn: Connection, threads: int, gpu: str | None) -> None:
    """A worker's loop: settings first (before any job imports torch), then one job per message
    ``(index, fn)`` until ``None``; answers ``(index, None)`` or ``(index, exception)``."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    # torch is imported by the first job that needs it (a run also sets its thread count itself)
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):  # the main process is gone, or Ctrl-C while idle
            return
        if message is None:
            return
        index, fn = message
        try:
            fn()
            conn.send((index, None))
        except BaseException as exc:  # noqa: BLE001  (KeyboardInterrupt too: the run saved and stopped)
            conn.send((index, portable(exc)))


def portable(exc: BaseException) -> BaseException:
    """What the parent needs of a run's exception, as a type every process can rebuild: a
    ``UserError`` or ``KeyboardInterrupt`` as such (its message), anything else as a RuntimeError
    holding its traceback text (no arbitrary exception object crosses the pipe)."""
    if isinstance(exc, UserError):
        return UserError(str(exc))
    if isinstance(exc, KeyboardInterrupt):
        return KeyboardInterrupt()
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return RuntimeError(f"{type(exc).__name__}: {exc}\n{text}")


@dataclass
class Worker:
    process: Any
    conn: Connection
    gpu: str | None
    job: int | None = None


@dataclass
class Pool:
    """The workers and the bookkeeping of :func:`run_processes`."""

    jobs: list[Job]
    execution: Execution
    todo: deque[int] = field(default_factory=deque)
    attempts: dict[int, int] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.threads = threads_per_run(self.execution)
        self.progress = Progress(len(self.jobs))
        self.todo.extend(range(len(self.jobs)))
        gpus = self.execution.resources_per_run.gpus
        count = min(self.execution.workers or 1, len(self.jobs))
        slots: list[str | None] = [None] * count
        if gpus > 0:
            visible = visible_gpus()
            slots = [visible[i % len(visible)] for i in range(count)]
        self.workers = [self.start(gpu) for gpu in slots]

    def start(self, gpu: str | None) -> Worker:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=worker_main, args=(child, self.threads, gpu), name="losslab-worker")
        process.start()
        child.close()
        return Worker(process, parent, gpu)

    def assign(self) -> None:
        for worker in list(self.workers):
            if worker.job is None and self.todo:
                index = self.todo.popleft()
                try:
                    worker.conn.send((index, self.jobs[index].fn))
                except OSError:  # this idle worker has died: replace it, the job waits for the next
                    self.todo.appendleft(index)
                    self.replace(worker)
                    continue
                self.attempts[index] = self.attempts.get(index, 0) + 1
                worker.job = index
                if self.attempts[index] == 1:
                    self.progress.started(self.jobs[index].label)

    def replace(self, worker: Worker) -> None:
        """Drop a dead worker; start a fresh one while jobs are waiting."""
        worker.conn.close()
        worker.process.join(timeout=10)
        self.workers.remove(worker)
        if self.todo:
            self.workers.append(self.start(worker.gpu))

    def busy(self) -> list[Worker]:
        return [w for w in self.workers if w.job is not None]

    def collect(self, worker: Worker) -> None:
        """The outcome of ``worker``'s job: an answer, or its death (then a retry or an error)."""
        index = worker.job
        assert index is not None
        label = self.jobs[index].label
        try:
            _, error = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(timeout=10)
            self.died(worker, index, label)
            return
        worker.job = None
        if error is None:
            self.progress.finished(label)
        else:
            self.errors[index] = error
            self.progress.failed(label, error)

    def died(self, worker: Worker, index: int, label: str) -> None:
        code = worker.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        attempts = self.execution.max_retries + 1
        if self.attempts[index] < attempts:
            self.progress.retried(label, f"its worker process died ({how})", self.attempts[index] + 1, attempts)
            self.todo.appendleft(index)
        else:
            error = UserError(
                f"run {label}: its worker process died {attempts} times (last: {how}); "
                "out of memory? (see the kernel log: dmesg)"
            )
            self.errors[index] = error
            self.progress.failed(label, error)
        self.replace(worker)

    def loop(self) -> None:
        self.assign()
        while busy := self.busy():
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for worker in busy:
                answered = worker.conn in ready or worker.process.sentinel in ready
                if answered and (worker.conn.poll() or not worker.process.is_alive()):
                    self.collect(worker)
            self.assign()

    def stop(self, interrupted: bool) -> None:
        """Ask the workers to end: after the current job (``None``), or at once on Ctrl-C (SIGINT:
        a run saves a checkpoint at the end of its step and stops)."""
        for worker in self.workers:
            if not worker.process.is_alive():
                continue
            if interrupted and worker.job is not None:
                with contextlib.suppress(OSError):
                    os.kill(worker.process.pid, signal.SIGINT)
            else:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
        for worker in self.workers:
            worker.process.join(timeout=STOP_WAIT_S if interrupted else 30)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()


def run_processes(jobs: list[Job] | Any, execution: Execution) -> None:
    """Run ``jobs`` on ``execution.workers`` spawned worker processes; returns once all are done
    (the first error in job order is raised after the others have finished)."""
    check_processes(execution)
    pool = Pool(list(jobs), execution)
    interrupted = False
    try:
        pool.loop()
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        pool.stop(interrupted)
    pool.progress.close()
    if pool.errors:
        raise pool.errors[min(pool.errors)]
