"""Tuning a variant's declared loss weights / schedule parameters on the validation split with
Optuna: one resumable study per tuned variant (:func:`tune_all`), a trial being one training
run, pruned early by the median pruner through :mod:`losslab.train.hooks`. The trials run on the
study's executor (``execution:``): ``workers`` tuning workers
(:class:`~losslab.compare.tuning_worker.TuningWorker`) share one storage.

Where studies and trials are stored, how a rerun resumes them, what a kill leaves, what pruning
costs and what is reproducible: docs/compare.md, "Tuning".
"""

from __future__ import annotations

from typing import Any

from losslab.compare.config import Study, Variant, config_hash, digest
from losslab.compare.execution import Job, run_jobs
from losslab.compare.runs import drop_checkpoints
from losslab.compare.tuning_worker import TuningWorker, fail_trial, make_pruner, make_sampler, open_storage
from losslab.errors import UserError

#: worker i samples with seed ``SEED_STRIDE * i`` + the trials in the study when it starts (distinct draws)
SEED_STRIDE = 1_000_003


def study_name(study: Study, variant: Variant) -> str:
    """The Optuna study name of a tuned variant: its name and a hash of its config, space, metric,
    direction, sampler and pruner (a stored study keeps its direction: a changed one must not
    reload it)."""
    t = study.config.tuning
    seed = study.config.seeds[0] if t.seed is None else t.seed
    space = {k: p.model_dump() for k, p in variant.tune.items()}
    what = {
        "base": config_hash(study.resolve(variant, seed)),
        "space": space,
        "metric": t.metric,
        "direction": t.direction,
        "sampler": t.sampler,
        "pruner": t.pruner,
    }
    return f"{variant.name}__{digest(what)}"


def storage_spec(study: Study) -> str:
    """Where the study's Optuna studies live: ``tuning.storage`` (a database URL) if given; else
    ``OUTPUT_DIR/tuning.db`` (SQLite) when an earlier losslab version left one there (so its
    studies resume); else the journal file ``OUTPUT_DIR/tuning.journal``."""
    if study.config.tuning.storage:
        return study.config.tuning.storage
    old = (study.out / "tuning.db").resolve()
    if old.is_file():
        return f"sqlite:///{old}"
    return str((study.out / "tuning.journal").resolve())


def tuning_workers(study: Study, left: int) -> int:
    """Tuning workers for ``left`` missing trials: 1 under the sequential backend, else
    ``execution.workers`` (processes: default 1; ray: default one per missing trial, Ray runs
    what fits), never more than ``left``."""
    e = study.config.execution
    if e.backend == "sequential":
        return 1
    wanted = e.workers or (left if e.backend == "ray" else 1)
    return max(1, min(wanted, left))


def fail_orphans(ostudy: Any) -> list[int]:
    """Fail every running trial: called only while no worker of the study runs, so each was left
    by a killed worker (of an earlier attempt, or of this one on another host)."""
    import optuna

    running = ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in running:
        fail_trial(ostudy, t, "its worker was killed (found running when no worker ran)")
    return [t.number for t in running]


def tune_variant(study: Study, variant: Variant) -> dict[str, Any]:
    """Run (or resume) the variant's Optuna study on the study's executor until it holds
    ``tuning.trials`` finished (complete or pruned) trials; returns its history and best values."""
    import optuna

    cfg = study.config
    t = cfg.tuning
    seed = cfg.seeds[0] if t.seed is None else t.seed
    storage = storage_spec(study)
    name = study_name(study, variant)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ostudy = optuna.create_study(
        study_name=name,
        storage=open_storage(storage),
        sampler=make_sampler(t.sampler, trials=t.trials, seed=0),
        pruner=make_pruner(t.pruner),
        direction="maximize" if t.direction == "max" else "minimize",
        load_if_exists=True,
    )
    S = optuna.trial.TrialState

    def finished() -> int:
        return len(ostudy.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED)))

    while True:
        failed = fail_orphans(ostudy)
        if failed:
            print(f"tuning {variant.name}: trials {failed} were left running by a killed worker: marked FAIL")
        done = finished()
        if done >= t.trials:
            break
        n = tuning_workers(study, t.trials - done)
        jobs = [
            Job(
                f"tune {variant.name} worker {i}",
                TuningWorker(study, variant.name, name, storage, t.trials, SEED_STRIDE * i, n > 1),
            )
            for i in range(n)
        ]
        print(f"tuning {variant.name}: {done}/{t.trials} trials finished, {n} worker(s) on {storage}", flush=True)
        run_jobs(jobs, cfg.execution)
        running = ostudy.get_trials(deepcopy=False, states=(S.RUNNING,))
        # no trial finished and none left running for the next round to mark FAIL and replace (a
        # worker retried on another node may have seen the budget taken by its own dead trial)
        if finished() == done and not running:
            raise UserError(f"tuning {variant.name!r}: the workers finished no trial ({done}/{t.trials} done)")
    if not cfg.keep_checkpoints:  # also those of trials killed in an earlier attempt
        for folder in (study.out / "tuning" / variant.name).glob("trial*"):
            drop_checkpoints(folder)
    trials = ostudy.get_trials()
    if not any(tr.state == S.COMPLETE for tr in trials):
        raise UserError(f"tuning {variant.name!r}: no trial completed (all {len(trials)} pruned or failed)")
    return {
        "study_name": name,
        "storage": storage,
        "metric": t.metric,
        "direction": t.direction,
        "seed": seed,
        "best_params": dict(ostudy.best_params),
        "best_value": ostudy.best_value,
        "trials": [
            {
                "number": tr.number,
                "state": tr.state.name,
                "value": tr.value,
                "params": dict(tr.params),
                "last_intermediate": (
                    tr.intermediate_values[max(tr.intermediate_values)] if tr.intermediate_values else None
                ),
                "last_step": max(tr.intermediate_values) if tr.intermediate_values else None,
                "folder": tr.user_attrs.get("folder"),
                "failed": tr.user_attrs.get("failed"),
            }
            for tr in trials
        ],
    }


def tune_all(study: Study) -> dict[str, dict[str, Any]]:
    """Tune every variant that declares a search space; variant name -> :func:`tune_variant` result."""
    out = {}
    for variant in study.config.variants:
        if variant.tune:
            out[variant.name] = tune_variant(study, variant)
            print(
                f"tuned {variant.name}: best {out[variant.name]['best_params']} "
                f"({study.config.tuning.metric} = {out[variant.name]['best_value']:.4g})"
            )
    return out
