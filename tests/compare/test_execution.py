"""The executors of ``losslab compare`` (sequential, processes, ray): the same per-run results as
the sequential one, a run whose worker is SIGKILLed is started again and resumes, a failing run
does not lose the others, bad settings are refused before any run, and ``keep_models``.

Jobs that need no model are ``functools.partial(exec, CODE)``: picklable by reference, so a
spawned worker runs them without importing this module."""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from losslab.compare import runs as runner
from losslab.compare.config import load_study
from losslab.compare.execution import Execution, Job, Resources, run_jobs, threads_per_run, usable_cores
from losslab.compare.keep import best_run, drop_model, keep_models
from losslab.compare.study import compare
from losslab.errors import UserError

from ..conftest import free_port, train_config


def code_job(label: str, code: str) -> Job:
    return Job(label, functools.partial(exec, code))


def appending(path: Path, text: str) -> str:
    return f"open({str(path)!r}, 'a').write({text!r} + '\\n')"


def kill_self_once(marker: Path) -> str:
    """Code that SIGKILLs its own process the first time it runs (``marker`` remembers)."""
    return (
        f"import os, signal, pathlib\nm = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n    m.touch()\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )


def test_processes_retry_a_killed_worker_and_finish_the_others_before_an_error(tmp_path: Path, capsys) -> None:
    log = tmp_path / "log.txt"
    jobs = [
        code_job("killed once", kill_self_once(tmp_path / "m1") + appending(log, "killed once")),
        code_job("fails", "raise ValueError('bad run')"),
        code_job("always killed", kill_self_once(tmp_path / "m2") + kill_self_once(tmp_path / "m3")),
        code_job("plain", appending(log, "plain")),
    ]
    execution = Execution(backend="processes", workers=2, max_retries=1)
    # the first error in job order, after the others; a worker sends its type, message and traceback as text
    with pytest.raises(RuntimeError, match="ValueError: bad run"):
        run_jobs(jobs, execution)
    assert sorted(log.read_text().split()) == ["killed", "once", "plain"]
    out = capsys.readouterr().out
    assert "killed once: its worker process died (killed by signal 9); started again (attempt 2 of 2" in out
    assert "FAILED: always killed: run always killed: its worker process died 2 times (last: killed by signal 9)" in out
    # the same jobs with more retries: no error but the ValueError
    jobs[1] = code_job("fine", appending(log, "fine"))
    for m in ("m1", "m2", "m3"):
        (tmp_path / m).unlink()
    run_jobs(jobs, Execution(backend="processes", workers=2, max_retries=2))
    assert log.read_text().split().count("fine") == 1 and log.read_text().split().count("plain") == 2


def test_threads_per_run_depend_on_the_settings_not_on_the_backend() -> None:
    cores = usable_cores()
    for backend in ("sequential", "processes"):
        assert threads_per_run(Execution(backend=backend, workers=1)) == cores
        assert threads_per_run(Execution(backend=backend, workers=2)) == max(1, cores // 2)
        assert threads_per_run(Execution(backend=backend, resources_per_run=Resources(cpus=3))) == 3
    assert threads_per_run(Execution(backend="ray")) == 1


def test_bad_execution_settings_are_refused_before_any_job(tmp_path: Path, monkeypatch) -> None:
    never = [code_job("never", appending(tmp_path / "ran", "ran"))]
    too_many = usable_cores() + 1
    with pytest.raises(UserError, match=rf"execution.workers': {too_many} worker processes, but .* {too_many - 1}"):
        run_jobs(never, Execution(backend="processes", workers=too_many))
    with pytest.raises(UserError, match=r"resources_per_run.cpus': 1 workers x 64 cores"):
        run_jobs(never, Execution(backend="processes", resources_per_run=Resources(cpus=64)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError, match=r"1 workers with 1 GPU each, but 0 GPU\(s\) are visible"):
        run_jobs(never, Execution(backend="processes", resources_per_run=Resources(gpus=1)))
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # Ray not installed
    with pytest.raises(UserError, match=r"ray needs the Ray extra: pip install 'losslab\[ray\]'"):
        run_jobs(never, Execution(backend="ray"))
    assert not (tmp_path / "ran").exists()


def test_an_unreachable_ray_address_is_refused_quickly(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    started = time.monotonic()
    with pytest.raises(UserError, match=r"cannot reach the Ray cluster at '127.0.0.1:\d+'"):
        run_jobs([code_job("never", "")], Execution(backend="ray", ray_address=f"127.0.0.1:{free_port()}"))
    assert time.monotonic() - started < 10


# ---- studies on the tiny model ------------------------------------------------------------------


def study_dict(out: Path, *, variants: int = 2, seeds: int = 2, steps: int = 2, save_steps: int = 1) -> dict:
    return {
        "output_dir": str(out),
        "base": train_config(
            None,
            validation=True,
            data={"max_train_samples": 8, "max_eval_samples": 4},
            training={"max_steps": steps, "batch_size": 2, "save_steps": save_steps},
        ),
        "variants": [{"name": "ce"}, {"name": "ls", "overrides": {"loss.terms.0.label_smoothing": 0.1}}][:variants],
        "seeds": list(range(seeds)),
        "metrics": [{"name": "validation/loss", "direction": "min"}],
        "stats": {"n_bootstrap": 200},
    }


def write_study(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def per_run(out: Path) -> dict[str, str]:
    """run folder name -> its metrics.json text."""
    return {p.parent.name: p.read_text() for p in sorted((out / "runs").glob("*/metrics.json"))}


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text().replace(str(out), "OUT"))


class Ref:
    """An object ref of :class:`FakeRay`: the task's exception, if it raised."""

    error: BaseException | None = None


class FakeRay:
    """Ray's driver API as run_ray uses it, running each task at submission: records ``init`` and
    ``shutdown`` so the test sees who opens and who closes the connection."""

    class exceptions:
        class RayTaskError(Exception):
            cause: BaseException

        class WorkerCrashedError(Exception):
            pass

        class NodeDiedError(Exception):
            pass

    def __init__(self, *, initialized: bool = False) -> None:
        self.initialized, self.calls = initialized, []

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **kwargs) -> None:
        self.calls.append("init")
        self.initialized = True

    def shutdown(self) -> None:
        self.calls.append("shutdown")
        self.initialized = False

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": 2.0}}]

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **kwargs):
                return self

            def remote(self, job_fn):
                fake.calls.append("task")
                ref = Ref()  # one object per task (the refs are dict keys)
                try:
                    fn(job_fn)
                except Exception as exc:  # noqa: BLE001
                    ref.error = exc
                return ref

        return Task()

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error


def test_ray_closes_the_connection_it_opened_and_leaves_a_joined_one(tmp_path: Path, monkeypatch) -> None:
    """A driver left connected after its cluster's GCS is gone is ended by Ray 60 s later (a
    notebook's kernel; this suite's process, after tune_variant on ray): run_ray called with no
    connection open (tune_variant directly) closes the one it opened, also when a job raises; a
    cluster the caller joined (ray.init in a notebook, a study's own connection) is left open."""
    import sys

    jobs = [code_job("a", appending(tmp_path / "ran", "a")), code_job("b", appending(tmp_path / "ran", "b"))]
    fresh = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fresh)
    run_jobs(jobs, Execution(backend="ray"))
    assert fresh.calls == ["init", "task", "task", "shutdown"] and not fresh.initialized
    assert (tmp_path / "ran").read_text().split() == ["a", "b"]
    with pytest.raises(RuntimeError, match="boom"):
        run_jobs([code_job("c", "raise RuntimeError('boom')")], Execution(backend="ray"))
    assert fresh.calls[-3:] == ["init", "task", "shutdown"] and not fresh.initialized
    joined = FakeRay(initialized=True)
    monkeypatch.setitem(sys.modules, "ray", joined)
    run_jobs(jobs, Execution(backend="ray"))
    assert joined.calls == ["task", "task"] and joined.initialized


def test_ray_ctrl_c_cancels_the_runs_and_lets_them_save_before_it_disconnects(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C while runs are in flight: each is cancelled (SIGINT to the task: the run saves a
    checkpoint), they get STOP_WAIT_S to do so, and only then does the connection close (which
    stops a local cluster's workers); the KeyboardInterrupt goes on to the caller."""
    import sys

    from losslab.compare.raytasks import STOP_WAIT_S

    class Interrupted(FakeRay):
        def wait(self, refs, num_returns=1, timeout=None):
            if timeout is None:  # the loop's wait for the next finished run: Ctrl-C arrives here
                raise KeyboardInterrupt
            self.calls.append(("wait", len(refs), num_returns, timeout))
            return refs, []

        def cancel(self, ref, force=False):
            self.calls.append(("cancel", force))

    fake = Interrupted()
    monkeypatch.setitem(sys.modules, "ray", fake)
    jobs = [code_job(name, "") for name in ("a", "b")]
    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, Execution(backend="ray", workers=2))
    assert fake.calls == [
        "init",
        "task",
        "task",
        ("cancel", False),
        ("cancel", False),
        ("wait", 2, 2, STOP_WAIT_S),
        "shutdown",
    ]


def test_processes_give_the_sequential_runs_and_bad_workers_lose_nothing(tmp_path: Path) -> None:
    """2 runs one after the other in this process, then in 2 worker processes: the same bits
    (metrics.json, log.jsonl's losses, the model) at the same threads per run (results.json's
    identity, over the whole study, is in the slow tests)."""
    small = {"variants": 1, "save_steps": 100}  # (no checkpoint: the slow tests kill and resume)
    seq_study = load_study(write_study(tmp_path / "seq", study_dict(tmp_path / "seq" / "out", **small)))
    par_out = tmp_path / "par" / "out"
    data = {**study_dict(par_out, **small), "execution": {"backend": "processes", "workers": 2}}
    par_study = load_study(write_study(tmp_path / "par", data))
    threads = threads_per_run(par_study.config.execution)
    runner.execute(runner.plan(seq_study), execution=Execution(resources_per_run=Resources(cpus=threads)))
    runner.execute(runner.plan(par_study), execution=par_study.config.execution)
    seq_out = tmp_path / "seq" / "out"
    assert per_run(par_out) == per_run(seq_out) and len(per_run(seq_out)) == 2
    for name in per_run(seq_out):
        losses = [[r.get("loss") for r in runner.read_log(o / "runs" / name)] for o in (seq_out, par_out)]
        assert losses[0] == losses[1] and any(losses[0])
        models = [(o / "runs" / name / "model" / "model.safetensors").read_bytes() for o in (seq_out, par_out)]
        assert models[0] == models[1]
    # the finished study again, with more workers than cores: refused before anything is touched
    before = {p: p.stat().st_mtime_ns for p in par_out.rglob("*")}
    data["execution"]["workers"] = usable_cores() + 1
    with pytest.raises(UserError, match=r"study\.yaml:\d+: field 'execution.workers'"):
        compare(load_study(write_study(tmp_path / "par", data)))
    assert {p: p.stat().st_mtime_ns for p in par_out.rglob("*")} == before


def test_command_line_flags_replace_the_execution_section(tmp_path: Path) -> None:
    from losslab.cli import build_parser
    from losslab.compare.study import with_execution_flags

    data = {**study_dict(tmp_path / "out"), "execution": {"backend": "processes", "workers": 2, "max_retries": 5}}
    path = write_study(tmp_path, data)
    args = build_parser().parse_args(["compare", str(path), "--backend", "ray", "--ray-address", "ray://head:10001"])
    execution = with_execution_flags(load_study(path), args).config.execution
    assert (execution.backend, execution.workers, execution.ray_address) == ("ray", 2, "ray://head:10001")
    assert execution.max_retries == 5  # what no flag names stays
    args = build_parser().parse_args(["compare", str(path), "--workers", "1", "--shard", "2/3"])
    assert with_execution_flags(load_study(path), args).config.execution.workers == 1 and args.shard == (2, 3)


def test_keep_models_keeps_the_best_seed_of_the_winning_variant(tmp_path: Path) -> None:
    data = study_dict(tmp_path / "out")
    data["metrics"] = [{"name": "test/x", "direction": "max"}, {"name": "validation/loss", "direction": "min"}]
    data["primary_metrics"] = ["validation/loss"]
    path = write_study(tmp_path, {**data, "metrics": data["metrics"][1:], "primary_metrics": None})
    study = load_study(path)
    runs = runner.plan(study)
    losses = {("ce", 0): 2.0, ("ce", 1): 1.0, ("ls", 0): 1.2, ("ls", 1): 1.3}  # ce: mean 1.5, ls: 1.25
    for run in runs:
        run.metrics = {"validation/loss": losses[(run.variant, run.seed)]}
        (run.dir / "model").mkdir(parents=True)
    trial = study.out / "tuning" / "ls" / "trial0__abc" / "model"
    trial.mkdir(parents=True)
    assert (best_run(study, runs).variant, best_run(study, runs).seed) == ("ls", 0)
    kept = keep_models(study, runs)
    assert kept == [runs[2].dir] and [r.dir for r in runs if (r.dir / "model").is_dir()] == kept
    assert not trial.exists() and not list(study.out.rglob(".deleting-*"))
    study.config.keep_models = "none"
    assert keep_models(study, runs) == [] and not list(study.out.rglob("model"))
    for run in runs:
        (run.dir / "model").mkdir()
    study.config.keep_models = "all"
    assert len(keep_models(study, runs)) == 4


# ---- slow: a real local Ray cluster, SIGKILLs mid-run, shards -----------------------------------


def study4(out: Path, backend: str = "sequential", **execution) -> dict:
    """The 4-run study (2 variants x 2 seeds, 6 steps, a checkpoint every step) at 1 thread per
    run: the thread count is part of a run's bits (1 and 2 threads differ from step 5 of these
    runs), so the executors are compared at the same count."""
    return {
        **study_dict(out, steps=6),
        "execution": {"backend": backend, "resources_per_run": {"cpus": 1}, **execution},
    }


@pytest.fixture(scope="module")
def sequential4(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("seq4")
    out = tmp / "out"
    compare(load_study(write_study(tmp, study4(out))))
    return out


def _kill_mid_run(out: Path, find_pids, timeout: float = 300) -> threading.Thread:
    """In a thread: once every process that ``find_pids()`` names (the workers training runs) can
    be training a run with a complete checkpoint (as many such runs as processes), SIGKILL one."""
    killed: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            mid = [  # runs with a complete checkpoint (a kill during a save is test_compare's case)
                d
                for d in out.glob("runs/*")
                if any(d.glob("checkpoint-*/losslab_checkpoint.json")) and not (d / "metrics.json").exists()
            ]
            pids = find_pids()
            if pids and len(mid) >= len(pids):
                print(f"killing {pids[0]} of {pids}; runs with a checkpoint: {[d.name for d in mid]}", flush=True)
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.killed = killed  # type: ignore[attr-defined]
    thread.start()
    return thread


def _processes_titled(prefix: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(prefix.encode()):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _children_running(parent: int, marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent and marker in (entry / "cmdline").read_text():
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


@pytest.mark.slow
def test_processes_worker_sigkilled_mid_run_gives_the_same_results(sequential4: Path, tmp_path: Path, capfd) -> None:
    out = tmp_path / "out"
    data = study4(out, "processes", workers=2)
    killer = _kill_mid_run(out, lambda: _children_running(os.getpid(), "spawn_main"))
    compare(load_study(write_study(tmp_path, data)))
    killer.join(timeout=1)
    assert killer.killed, "no worker was killed"  # type: ignore[attr-defined]
    printed = capfd.readouterr().out  # (the workers print to the same file descriptors)
    assert "its worker process died (killed by signal 9); started again" in printed and "resuming from" in printed
    assert per_run(out) == per_run(sequential4) and results(out) == results(sequential4)


@pytest.fixture
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_gives_the_sequential_results_even_with_a_worker_sigkilled(
    ray_cluster, sequential4: Path, tmp_path: Path, capfd
) -> None:
    out = tmp_path / "out"
    data = study4(out, "ray")
    killer = _kill_mid_run(out, lambda: _processes_titled("ray::losslab_run"))
    compare(load_study(write_study(tmp_path, data)))
    killer.join(timeout=1)
    assert killer.killed, "no Ray worker was killed"  # type: ignore[attr-defined]
    printed = capfd.readouterr().out
    deadline = time.monotonic() + 20  # Ray forwards the workers' output a moment later
    while "resuming from" not in printed and time.monotonic() < deadline:
        time.sleep(0.5)
        printed += capfd.readouterr().out
    assert "resuming from" in printed  # the retried task resumed from its checkpoint
    assert per_run(out) == per_run(sequential4) and results(out) == results(sequential4)
    assert ray_cluster.is_initialized()  # the cluster this process had joined is left to it
    # a run larger than any node: refused before any run
    data["execution"]["resources_per_run"] = {"cpus": 4}
    with pytest.raises(UserError, match=r"a run needs 4 CPU and 0 GPU, but no node of the Ray cluster"):
        compare(load_study(write_study(tmp_path, data)))


@pytest.mark.slow
def test_shards_then_a_plain_compare_give_the_sequential_results(sequential4: Path, tmp_path: Path) -> None:
    from losslab.cli import main

    out = tmp_path / "out"
    path = write_study(tmp_path, study4(out))
    assert main(["compare", str(path), "--shard", "2/3"]) == 0
    assert len(per_run(out)) == 1 and not (out / "results.json").exists()  # run 2 of 4 only
    assert main(["compare", str(path), "--shard", "1/3"]) == 0
    assert main(["compare", str(path), "--shard", "3/3"]) == 0
    assert len(per_run(out)) == 4
    calls: list[str] = []
    real = runner.train_run
    runner.train_run = lambda config: calls.append(config["output_dir"]) or real(config)
    try:
        assert main(["compare", str(path)]) == 0
    finally:
        runner.train_run = real
    assert calls == [] and per_run(out) == per_run(sequential4) and results(out) == results(sequential4)


def test_drop_model_deletes_the_adapter_and_the_merged_model(tmp_path: Path) -> None:
    """A LoRA run with ``merge: true`` holds two final models; a dropped run keeps neither, and
    what a kill mid-way left (``.deleting-*``) is finished."""
    for name in ("model", "model_merged", ".deleting-model"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.safetensors").write_bytes(b"x")
    (tmp_path / "metrics.json").write_text("{}")
    drop_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
