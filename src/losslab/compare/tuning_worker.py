"""One tuning worker: a picklable job (:class:`TuningWorker`) that opens a variant's Optuna study in
its shared storage and runs trials until the study holds ``budget`` finished (complete or pruned)
trials. Several workers (processes, Ray tasks, machines) may run on one storage at once.

Claiming a trial is exact: under a lock file next to the trial folders, a worker counts the
finished and the live running trials and creates a new trial only while that count is below the
budget, so the study never ends with more finished trials than the budget (a worker whose trial
fails or is killed leaves a slot that another worker, or the next attempt, fills).

Each trial records its owner (``user_attrs["worker"]``: host, pid, process start time) and its
folder. A running trial whose owner is a dead process on this host is marked ``FAIL`` before a
claim; the coordinator (:func:`losslab.compare.tuning.tune_variant`) fails every running trial
left when no worker of the study runs (killed on another host, or with the whole command).
Optuna's heartbeat (``RDBStorage(heartbeat_interval=...)``) is not used: the journal storage
has none in Optuna 5.0, and it only runs inside ``Study.optimize``, which cannot claim trials
under a budget.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from losslab.compare.config import Param, Study, config_hash
from losslab.compare.runs import drop_checkpoints, train_run
from losslab.errors import UserError
from losslab.eval.report import read_metrics_json


def open_storage(spec: str) -> Any:
    """An Optuna storage from its spec: a database URL (``sqlite:///...``, ``postgresql://...``,
    ``mysql+pymysql://...``: an ``RDBStorage``) or a file path (a ``JournalStorage`` on that file,
    safe for processes on one machine and on a shared file system, NFSv2 or later)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    return optuna.storages.JournalStorage(JournalFileBackend(spec))


def suggest(trial: Any, key: str, param: Param) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(key, param.choices)
    low, high = param.low, param.high
    assert low is not None and high is not None, "Param's validator requires low and high for float/int"
    if param.type == "int":
        return trial.suggest_int(key, int(low), int(high), log=param.log)
    return trial.suggest_float(key, low, high, log=param.log)


def make_sampler(kind: str, *, trials: int, seed: int, parallel: bool = False) -> Any:
    """TPE (random for its first ``min(10, max(2, trials // 2))`` trials, so a small budget still
    gets model-guided trials) or random search, seeded with ``seed``. ``parallel``: TPE with the
    constant liar (running trials count as bad), so parallel workers spread out."""
    import optuna

    if kind == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=min(10, max(2, trials // 2)), constant_liar=parallel
        )
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(kind: str) -> Any:
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


# -- trial ownership ---------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from /proc), ``"?"`` where /proc
    is missing but the process exists, None when there is no such live process (zombies too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").is_file():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3, starttime 22
    return None if fields[0] in ("Z", "X") else fields[19]


def owner() -> dict[str, Any]:
    """This process as a trial's owner: host, pid and process start time (tells a reused pid apart)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def owner_is_dead(record: Any) -> bool:
    """Whether a trial's owner record names a process on this host that no longer runs. An owner
    on another host, or none, counts as alive (the coordinator fails those trials between rounds)."""
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return False
    now = _process_start(int(record["pid"]))
    return now is None or (record.get("start") not in (None, "?") and now not in ("?", record["start"]))


def fail_trial(ostudy: Any, trial: Any, reason: str) -> None:
    """Mark a running trial ``FAIL`` (``user_attrs["failed"]`` says why); a no-op on a trial that
    finished meanwhile (Optuna keeps a trial's first finished state)."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        ostudy._storage.set_trial_user_attr(trial._trial_id, "failed", reason)
        ostudy._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    except UpdateFinishedTrialError:
        pass


def fail_dead_trials(ostudy: Any) -> list[int]:
    """Fail the running trials whose owner is a dead process on this host; their numbers."""
    import optuna

    dead = [
        t
        for t in ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if owner_is_dead(t.user_attrs.get("worker"))
    ]
    for t in dead:
        w = t.user_attrs["worker"]
        fail_trial(ostudy, t, f"its worker (pid {w['pid']} on {w['host']}) died")
    return [t.number for t in dead]


@contextmanager
def claim_lock(path: Path) -> Iterator[None]:
    """An inter-process lock on ``path`` (a file created with O_EXCL, as Optuna's journal lock;
    works on NFSv3+; a lock left by a killed holder is broken after 30 s)."""
    from optuna.storages.journal import JournalFileOpenLock

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


# -- the worker --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuningWorker:
    """A :class:`~losslab.compare.execution.Job` function: run trials of ``variant``'s Optuna study
    ``study_name`` in ``storage`` (an :func:`open_storage` spec) until it holds ``budget``
    finished trials, sampling with seed ``seed`` + the number of trials in the study when it starts. Idempotent: rerunning it after a kill (or after the
    budget is reached) claims only the trials still missing."""

    study: Study
    variant: str
    study_name: str
    storage: str
    budget: int
    seed: int
    parallel: bool = False

    @property
    def folder(self) -> Path:
        return self.study.out / "tuning" / self.variant

    def __call__(self) -> None:
        import optuna

        t = self.study.config.tuning
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(self.storage)
        ostudy = optuna.load_study(study_name=self.study_name, storage=storage, pruner=make_pruner(t.pruner))
        # seeded with the trials so far too: a worker started again after a kill (or a resumed study)
        # must not draw its first attempt's values again
        seed = self.seed + len(ostudy.get_trials(deepcopy=False))
        ostudy.sampler = make_sampler(t.sampler, trials=self.budget, seed=seed, parallel=self.parallel)
        while (trial := self.claim(ostudy)) is not None:
            self.run_trial(ostudy, trial)

    def claim(self, ostudy: Any) -> Any:
        """A new running trial owned by this process, or None once the finished and live running
        trials fill the budget."""
        import optuna

        S = optuna.trial.TrialState
        with claim_lock(self.folder / "claim"):
            fail_dead_trials(ostudy)
            if len(ostudy.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.RUNNING))) >= self.budget:
                return None
            trial = ostudy.ask()
            trial.set_user_attr("worker", owner())
            return trial

    def run_trial(self, ostudy: Any, trial: Any) -> None:
        import optuna

        S = optuna.trial.TrialState
        try:
            value = self.objective(trial)
        except optuna.TrialPruned:
            ostudy.tell(trial, state=S.PRUNED, skip_if_finished=True)
        except BaseException:
            ostudy.tell(trial, state=S.FAIL, skip_if_finished=True)
            raise
        else:
            ostudy.tell(trial, value, skip_if_finished=True)

    def objective(self, trial: Any) -> float:
        """Train the trial's config in ``tuning/<variant>/trial<number>__<hash>/`` (a folder of
        its own: trial numbers are unique in the study) and return its ``tuning.metric``."""
        import optuna

        cfg = self.study.config
        t = cfg.tuning
        variant = self.study.variant(self.variant)
        seed = cfg.seeds[0] if t.seed is None else t.seed
        params = {key: suggest(trial, key, p) for key, p in variant.tune.items()}
        data = self.study.resolve(variant, seed, params)
        folder = self.folder / f"trial{trial.number}__{config_hash(data)}"
        trial.set_user_attr("folder", str(folder))
        print(f"\ntuning {variant.name}: trial {trial.number} (pid {os.getpid()}) {params} -> {folder}", flush=True)

        def report(step: int, validation_metrics: Any) -> None:
            value = validation_metrics().get(t.metric)
            if value is None or not math.isfinite(value):
                return
            trial.report(float(value), step)
            if trial.should_prune():
                print(
                    f"tuning {variant.name}: trial {trial.number} pruned at step {step} ({t.metric} = {value:.4g})",
                    flush=True,
                )
                raise optuna.TrialPruned(f"step {step}: {t.metric} = {value:.4g}")

        if not (folder / "metrics.json").is_file():
            try:
                train_run({**data, "output_dir": str(folder)}, on_evaluate=report if t.pruner != "none" else None)
            finally:  # an ended trial is never resumed (a later trial is a new trial, in a new folder)
                if not cfg.keep_checkpoints:
                    drop_checkpoints(folder)
        metrics = read_metrics_json(folder / "metrics.json")
        value = metrics.get(t.metric)
        if value is None:
            raise UserError(
                f"tuning.metric {t.metric!r} is not in {folder / 'metrics.json'} "
                f"(available: {', '.join(k for k in metrics if k.startswith('validation/'))})"
            )
        return float(value)
