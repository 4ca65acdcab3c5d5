"""Parallel tuning: tuning workers share one Optuna storage (a journal file), fill the trial budget
exactly, and a worker SIGKILLed mid-trial loses no trial and records none twice.

The default tests run the real workers, storage, locks and kills with a stand-in for training
(each trial writes ``metrics.json`` from its parameter, so the records are known); the ``slow``
test does the same with real training of the tiny model in two spawned processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from losslab.compare import tuning_worker
from losslab.compare.config import Study, load_study
from losslab.compare.execution import Job, run_jobs
from losslab.compare.tuning import SEED_STRIDE, storage_spec, study_name, tune_variant
from losslab.compare.tuning_worker import TuningWorker, open_storage, owner

from ..conftest import train_config, wait_for

KEY = "loss.terms.1.weight.start"
S = optuna.trial.TrialState


def make_study(tmp_path: Path, *, trials: int, sampler: str = "tpe", steps: int = 2, pruner: str = "none") -> Study:
    data = {
        "output_dir": str(tmp_path / "out"),
        "base": train_config(
            None,
            validation=True,
            data={"max_train_samples": 16, "max_eval_samples": 4},
            training={"max_steps": steps, "eval_steps": 2},
        ),
        "variants": [
            {
                "name": "ce_consistency",
                "overrides": {
                    "loss.terms": [
                        {"name": "token_cross_entropy"},
                        {"name": "consistency", "weight": {"schedule": "linear", "start": 0.3, "end": 0.0}},
                    ]
                },
                "tune": {KEY: {"low": 0.1, "high": 0.7}},
            }
        ],
        "seeds": [0],
        "metrics": [{"name": "validation/loss", "direction": "min"}],
        "tuning": {"trials": trials, "sampler": sampler, "pruner": pruner},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    study = load_study(path)
    study.out.mkdir(parents=True, exist_ok=True)
    return study


def fake_loss(weight: float) -> float:
    return round((weight - 0.3) ** 2 + 1.0, 6)


def fake_train(block: Path | None = None, seconds: float = 0.0):
    """A stand-in for ``train_run``: writes the folder's ``log.jsonl`` and ``metrics.json`` from the
    trial's weight after ``seconds``; with ``block``, touches that file first and hangs (a trial
    mid-training)."""

    def train(config: dict[str, Any], on_evaluate: Any = None) -> dict[str, float]:
        out = Path(config["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "log.jsonl").write_text(json.dumps({"step": 1}) + "\n")
        if block is not None:
            block.write_text(str(os.getpid()))
            time.sleep(600)
        time.sleep(seconds)
        metrics = {"validation/loss": fake_loss(config["loss"]["terms"][1]["weight"]["start"]), "train/steps": 2}
        (out / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    return train


def worker(study: Study, index: int = 0) -> TuningWorker:
    """Tuning worker ``index`` of the study's variant, as :func:`tune_variant` makes them."""
    variant = study.config.variants[0]
    t = study.config.tuning
    name, storage = study_name(study, variant), storage_spec(study)
    return TuningWorker(study, variant.name, name, storage, t.trials, SEED_STRIDE * index, True)


def create(study: Study) -> optuna.Study:
    """The variant's Optuna study, created as :func:`tune_variant` does before it starts workers."""
    return optuna.create_study(
        study_name=study_name(study, study.config.variants[0]),
        storage=open_storage(storage_spec(study)),
        load_if_exists=True,
    )


def _run_forked(work: TuningWorker, train: Any) -> None:
    tuning_worker.train_run = train  # this process only (forked)
    work()


def fork(work: TuningWorker, train: Any) -> multiprocessing.process.BaseProcess:
    proc = multiprocessing.get_context("fork").Process(target=_run_forked, args=(work, train))
    proc.start()
    return proc


def check_records(study: Study, result: dict[str, Any], budget: int) -> list[dict[str, Any]]:
    """Every trial once, ``budget`` finished, one folder and distinct values each, and the best value
    is the best of the finished trials' own ``metrics.json``; returns the trials."""
    trials = result["trials"]
    numbers = [t["number"] for t in trials]
    assert numbers == list(range(len(trials)))  # each trial once, none lost
    assert sum(t["state"] in ("COMPLETE", "PRUNED") for t in trials) == budget
    drawn = [t["params"][KEY] for t in trials if t["params"]]
    assert len(set(drawn)) == len(drawn)  # no worker (nor a worker started again) repeats another's values
    folders = [t["folder"] for t in trials if t["folder"]]
    assert len(set(folders)) == len(folders)  # no two trials share a folder
    assert all(Path(f).name.startswith(f"trial{t['number']}__") for t in trials for f in [t["folder"]] if f)
    records = {}
    for t in trials:
        if t["state"] == "COMPLETE":
            metrics = json.loads((Path(t["folder"]) / "metrics.json").read_text())
            assert metrics["validation/loss"] == pytest.approx(t["value"], abs=0)
            records[t["number"]] = metrics["validation/loss"]
    assert result["best_value"] == min(records.values())
    stored = optuna.load_study(study_name=result["study_name"], storage=open_storage(result["storage"]))
    assert [t.number for t in stored.trials] == numbers and not stored.get_trials(states=(S.RUNNING,))
    return trials


def test_two_workers_on_one_journal_fill_the_budget_exactly(tmp_path: Path) -> None:
    study = make_study(tmp_path, trials=7)
    create(study)
    procs = [fork(worker(study, i), fake_train(seconds=0.3)) for i in (0, 1)]
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert storage_spec(study).endswith("tuning.journal") and Path(storage_spec(study)).is_file()
    result = tune_variant(study, study.config.variants[0])  # nothing left to run: it only reports
    trials = check_records(study, result, budget=7)
    assert len(trials) == 7 and {t["state"] for t in trials} == {"COMPLETE"}
    pids = {
        t.user_attrs["worker"]["pid"]
        for t in optuna.load_study(study_name=result["study_name"], storage=open_storage(result["storage"])).trials
    }
    assert pids == {p.pid for p in procs}  # both took trials


@pytest.mark.parametrize("when", ["before_the_other_claims", "after_the_other_ended"])
def test_a_worker_killed_mid_trial_loses_no_trial_and_records_none_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """SIGKILL of one of two workers mid-trial, then a resume. Killed before the other worker's
    claims, its running trial is failed by that worker (a dead pid on this host) and the other
    fills the budget; killed after the other ended (which left the slot to the running trial),
    the resume (:func:`tune_variant`) fails it and runs the missing trial."""
    study = make_study(tmp_path, trials=4)
    create(study)
    monkeypatch.setattr(tuning_worker, "train_run", fake_train())  # the resume's trial, in this process
    marker = tmp_path / "victim-is-training"
    victim = fork(worker(study, 0), fake_train(block=marker))
    wait_for(marker.is_file, timeout=60)
    if when == "before_the_other_claims":
        os.kill(victim.pid, signal.SIGKILL)  # not joined yet: a zombie, which counts as dead
    other = fork(worker(study, 1), fake_train())
    other.join(60)
    assert other.exitcode == 0
    if when == "after_the_other_ended":
        os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    assert victim.exitcode == -signal.SIGKILL
    stored = optuna.load_study(
        study_name=study_name(study, study.config.variants[0]), storage=open_storage(storage_spec(study))
    )
    finished_before_resume = len(stored.get_trials(states=(S.COMPLETE, S.PRUNED)))
    assert finished_before_resume == (4 if when == "before_the_other_claims" else 3)
    result = tune_variant(study, study.config.variants[0])  # the resume (sequential)
    trials = check_records(study, result, budget=4)
    killed = trials[0]
    assert killed["state"] == "FAIL" and killed["value"] is None
    assert ("died" if when == "before_the_other_claims" else "killed") in killed["failed"]
    assert (Path(killed["folder"]) / "log.jsonl").is_file() and not (Path(killed["folder"]) / "metrics.json").exists()
    assert len(trials) == 5
    # a second resume changes nothing
    assert tune_variant(study, study.config.variants[0])["trials"] == trials


def test_a_trial_left_running_on_another_host_is_failed_by_the_resume(tmp_path: Path, monkeypatch) -> None:
    """An owner on another host cannot be checked from here: the workers treat its trial as live
    (they stop at the budget), and the next round of the coordinator fails it and fills the slot."""
    study = make_study(tmp_path, trials=2, sampler="random")
    ostudy = create(study)
    left = ostudy.ask()
    left.set_user_attr("worker", {"host": "node-7.elsewhere", "pid": 1, "start": "1"})
    monkeypatch.setattr(tuning_worker, "train_run", fake_train())
    worker(study)()  # sees 1 running of 2: runs one trial only
    assert len(ostudy.get_trials(states=(S.COMPLETE,))) == 1 and ostudy.trials[0].state == S.RUNNING
    jobs: list[Job] = []
    monkeypatch.setattr("losslab.compare.tuning.run_jobs", lambda js, e: (jobs.extend(js), run_jobs(js, e)))
    result = tune_variant(study, study.config.variants[0])
    assert len(jobs) == 1 and jobs[0].label == "tune ce_consistency worker 0"
    trials = check_records(study, result, budget=2)
    assert [t["state"] for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]


def test_a_dead_owner_is_told_from_a_live_one_and_from_a_reused_pid() -> None:
    me = owner()
    assert not tuning_worker.owner_is_dead(me)
    assert not tuning_worker.owner_is_dead({**me, "host": "node-7.elsewhere"}) and not tuning_worker.owner_is_dead(None)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert tuning_worker.owner_is_dead({**me, "pid": ended.pid, "start": None})
    if me["start"] != "?":  # /proc: same pid, other start time = another process that reused the pid
        assert tuning_worker.owner_is_dead({**me, "start": str(int(me["start"]) - 1)})


def test_an_older_sqlite_store_keeps_resuming_and_parallel_workers_follow_the_executor(tmp_path: Path) -> None:
    study = make_study(tmp_path, trials=3)
    assert storage_spec(study) == str((study.out / "tuning.journal").resolve())
    (study.out / "tuning.db").touch()
    assert storage_spec(study) == f"sqlite:///{(study.out / 'tuning.db').resolve()}"
    from losslab.compare.tuning import tuning_workers

    e = study.config.execution
    assert tuning_workers(study, 3) == 1
    for backend, workers, left, n in [
        ("processes", 4, 3, 3),
        ("processes", None, 3, 1),
        ("ray", None, 5, 5),
        ("ray", 2, 5, 2),
    ]:
        study.config.execution = e.model_copy(update={"backend": backend, "workers": workers})
        assert tuning_workers(study, left) == n


@pytest.mark.slow
def test_real_training_two_spawned_workers_a_kill_then_a_resume(tmp_path: Path) -> None:
    """The acceptance run with real training of the tiny model: two spawned worker processes on
    one journal, one SIGKILLed while its trial trains, then a resume through run_jobs."""
    study = make_study(tmp_path, trials=3, steps=4, pruner="median")
    ostudy = create(study)
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=worker(study, i)) for i in (0, 1)]
    for proc in procs:
        proc.start()
    victim, other = procs
    try:

        def victim_trains() -> bool:
            for t in ostudy.get_trials(states=(S.RUNNING,)):
                folder = t.user_attrs.get("folder")
                if (
                    t.user_attrs.get("worker", {}).get("pid") == victim.pid
                    and folder
                    and (Path(folder) / "log.jsonl").is_file()
                ):
                    return True
            return False

        wait_for(victim_trains, timeout=600, poll=0.02)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        other.join(900)
        assert other.exitcode == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    result = tune_variant(study, study.config.variants[0])  # the resume: runs what is missing, if anything
    trials = check_records(study, result, budget=3)
    killed = [t for t in trials if t["state"] == "FAIL"]
    assert len(killed) == 1 and not (Path(killed[0]["folder"]) / "metrics.json").exists()
    assert killed[0]["failed"]  # by the other worker (a dead pid here), or by the resume


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_real_training_on_an_executor_a_worker_killed_mid_trial(backend: str, tmp_path: Path) -> None:
    """The same through ``losslab compare``'s executor: ``execution: {backend: processes | ray,
    workers: 2}`` (ray: a local cluster that losslab starts on 127.0.0.1); one worker process
    SIGKILLed while its trial trains is started again (by the executor, or by Ray), and the study
    still ends with the budget of finished trials, each recorded once."""
    import threading

    from losslab.compare.execution import Execution

    if backend == "ray":
        pytest.importorskip("ray")
    study = make_study(tmp_path, trials=3, steps=4, pruner="median")
    study.config.execution = Execution(backend=backend, workers=2, max_retries=1)
    ostudy = create(study)
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def tune() -> None:
        try:
            results.append(tune_variant(study, study.config.variants[0]))
        except BaseException as exc:  # noqa: BLE001  (reported by the test below)
            errors.append(exc)

    thread = threading.Thread(target=tune)
    thread.start()
    killed: list[int] = []

    def a_trial_trains() -> bool:
        for t in ostudy.get_trials(states=(S.RUNNING,)):
            folder, pid = t.user_attrs.get("folder"), t.user_attrs.get("worker", {}).get("pid")
            if pid and folder and (Path(folder) / "log.jsonl").is_file():
                killed.append(t.number)
                os.kill(pid, signal.SIGKILL)
                return True
        return False

    wait_for(lambda: a_trial_trains() or not thread.is_alive(), timeout=600, poll=0.02)
    thread.join(900)
    assert killed and not errors and results, errors
    trials = check_records(study, results[0], budget=3)
    assert [t["number"] for t in trials if t["state"] == "FAIL"] == killed
    assert tune_variant(study, study.config.variants[0])["trials"] == trials  # a resume changes nothing
    if backend == "ray":  # the local cluster tune_variant started is stopped, and this process disconnected
        import ray

        assert not ray.is_initialized()
