"""The ``ray`` backend: every job is a Ray task with the study's ``resources_per_run`` (CPUs, GPUs).

:func:`connect` joins the cluster at ``ray_address`` (first checking, with a short timeout, that
the address answers), or starts a local one on 127.0.0.1 without the dashboard; a cluster that
``ray.init`` already joined in this process (a test, a notebook) is used as it is, and left as it
is. A connection losslab makes is closed (``ray.shutdown()``, which also stops a local cluster it
started) by whoever opened it: :func:`disconnect` after a study, :func:`run_ray` when it had to
connect itself (``tune_variant`` called directly). A driver left connected after its cluster's
GCS has gone is ended by Ray itself 60 s later (a notebook's kernel, a test process). Ray starts a
task whose worker process died again on another worker (``max_retries``), and the run resumes
from its last checkpoint; a task that raises is not retried. Every worker must see the study's
output_dir at the same absolute path (shared storage): a run that does not find it stops with an
error naming the node.
"""

from __future__ import annotations

import socket
from typing import Any

from losslab.compare.jobs import Execution, Job, Progress
from losslab.errors import UserError

CONNECT_TIMEOUT_S = 5.0
STOP_WAIT_S = 300.0  # Ctrl-C: how long cancelled runs get to save their checkpoints (Ctrl-C again: at once)
INSTALL = "pip install 'losslab[ray]'"
_joined_here = False  # losslab called ray.init (and calls ray.shutdown in disconnect)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(f"field 'execution.backend': ray needs the Ray extra: {INSTALL}") from None
    return ray


def host_port(address: str) -> tuple[str, int] | None:
    """``ray://host:10001`` or ``host:6379`` -> (host, port); None for ``auto``/``local``."""
    rest = address.removeprefix("ray://")
    if rest in ("auto", "local") or ":" not in rest:
        return None
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        raise UserError(f"field 'execution.ray_address': {address!r}: the port {port!r} is not a number")
    return host.strip("[]"), int(port)


def check_reachable(address: str) -> None:
    """A TCP connection to the address within CONNECT_TIMEOUT_S, else a UserError (``ray.init``
    itself retries an unreachable address for a minute or more)."""
    target = host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(
            f"field 'execution.ray_address': cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}); "
            "is it running (`ray status` on its head node) and is the port open from here?"
        ) from None


def connect(execution: Execution) -> Any:
    """Join (or start) the cluster and check that one run fits on one of its nodes; returns ``ray``."""
    global _joined_here
    ray = import_ray()
    if not ray.is_initialized():
        address = execution.ray_address
        if address:
            check_reachable(address)
        try:
            if address:
                ray.init(address=address, logging_level="WARNING", log_to_driver=True)
            else:
                ray.init(
                    address="local", include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING"
                )
            _joined_here = True
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"field 'execution.ray_address': cannot join the Ray cluster {address!r}: {exc}") from None
    check_fits(ray, execution)
    return ray


def disconnect() -> None:
    """Close the connection :func:`connect` opened (stopping the local cluster it started); a
    cluster joined before losslab was called is left connected."""
    global _joined_here
    if _joined_here:
        import ray

        ray.shutdown()
        _joined_here = False


def check_fits(ray: Any, execution: Execution) -> None:
    """A run that no node of the cluster can hold would wait for ever: a UserError instead."""
    need = {"CPU": ray_cpus(execution), "GPU": float(execution.resources_per_run.gpus)}
    nodes: list[dict[str, float]] = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(node.get(k, 0.0) >= v for k, v in need.items() if v > 0) for node in nodes):
        return
    largest: dict[str, float] = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
    raise UserError(
        f"field 'execution.resources_per_run': a run needs {need['CPU']:g} CPU and {need['GPU']:g} GPU, "
        f"but no node of the Ray cluster has that much (largest: {largest.get('CPU', 0):g} CPU, "
        f"{largest.get('GPU', 0):g} GPU; {len(nodes)} node(s))"
    )


def ray_cpus(execution: Execution) -> float:
    """The CPUs Ray reserves for a run: ``resources_per_run.cpus``, default 1 (its torch threads:
    :func:`~losslab.compare.execution.threads_per_run`)."""
    return float(execution.resources_per_run.cpus or 1)


def losslab_run(fn: Any) -> None:
    """The Ray task (its worker's process title is ``ray::losslab_run`` while it runs)."""
    fn()


def run_ray(jobs: list[Job] | Any, execution: Execution) -> None:
    """Run ``jobs`` as Ray tasks, at most ``execution.workers`` at once (default: all submitted,
    Ray runs what fits); returns once all are done, then raises the first error in job order.
    A connection opened here (none was open) is closed before it returns."""
    opened = not import_ray().is_initialized()
    try:
        _run_tasks(connect(execution), jobs, execution)
    finally:
        if opened:
            disconnect()


def _run_tasks(ray: Any, jobs: list[Job] | Any, execution: Execution) -> None:
    jobs = list(jobs)
    task = ray.remote(losslab_run).options(
        num_cpus=ray_cpus(execution),
        num_gpus=float(execution.resources_per_run.gpus),
        max_retries=execution.max_retries,
        retry_exceptions=False,
    )
    limit = execution.workers or len(jobs)
    progress = Progress(len(jobs))
    waiting = list(range(len(jobs)))
    running: dict[Any, int] = {}
    errors: dict[int, BaseException] = {}
    try:
        while waiting or running:
            while waiting and len(running) < limit:
                index = waiting.pop(0)
                progress.started(jobs[index].label)
                running[task.remote(jobs[index].fn)] = index
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                index = running.pop(ref)
                try:
                    ray.get(ref)
                except Exception as exc:  # noqa: BLE001
                    errors[index] = unwrap(ray, exc, jobs[index].label, execution.max_retries)
                    progress.failed(jobs[index].label, errors[index])
                else:
                    progress.finished(jobs[index].label)
    except KeyboardInterrupt:
        for ref in running:  # SIGINT to the task: the run saves a checkpoint and stops
            ray.cancel(ref, force=False)
        if running:  # before the connection closes (which stops a local cluster's workers): their checkpoints
            ray.wait(list(running), num_returns=len(running), timeout=STOP_WAIT_S)
        raise
    progress.close()
    if errors:
        raise errors[min(errors)]


def unwrap(ray: Any, exc: BaseException, label: str, retries: int) -> BaseException:
    """The job's own exception out of Ray's wrapper; a dead worker after every retry: a UserError."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        return cause if isinstance(cause, BaseException) else exc
    if isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return UserError(f"run {label}: its Ray worker died {retries + 1} times ({type(exc).__name__}): {exc}")
    return exc
