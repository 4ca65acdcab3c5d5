"""Tuning a variant's declared loss weights / schedule parameters on the validation split with
Optuna: one resumable study per tuned variant (:func:`tune_all`), a trial being one training
run, pruned early by the median pruner through :mod:`losslab.train.hooks`.

Where studies and trials are stored, how a rerun resumes them, and what pruning costs:
docs/compare.md, "Tuning".
"""

from __future__ import annotations

import math
from typing import Any

from losslab.compare.config import Param, Study, Variant, config_hash, digest
from losslab.compare.runs import drop_checkpoints, train_run
from losslab.errors import UserError
from losslab.eval.report import read_metrics_json


def suggest(trial: Any, key: str, param: Param) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(key, param.choices)
    low, high = param.low, param.high
    assert low is not None and high is not None, "Param's validator requires low and high for float/int"
    if param.type == "int":
        return trial.suggest_int(key, int(low), int(high), log=param.log)
    return trial.suggest_float(key, low, high, log=param.log)


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


def make_sampler(kind: str, *, trials: int, seed: int) -> Any:
    """TPE (random for its first ``min(10, max(2, trials // 2))`` trials, so a small budget still
    gets model-guided trials) or random search, seeded with ``seed``."""
    import optuna

    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 2)))
    return optuna.samplers.RandomSampler(seed=seed)


def tune_variant(study: Study, variant: Variant) -> dict[str, Any]:
    """Run (or resume) the variant's Optuna study; returns its history and best values."""
    import optuna

    cfg = study.config
    t = cfg.tuning
    seed = cfg.seeds[0] if t.seed is None else t.seed
    storage = t.storage or f"sqlite:///{(study.out / 'tuning.db').resolve()}"
    name = study_name(study, variant)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
        if t.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ostudy = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(t.sampler, trials=t.trials, seed=0),
        pruner=pruner,
        direction="maximize" if t.direction == "max" else "minimize",
        load_if_exists=True,
    )
    # Resumed: a sampler seeded as in the first attempt would draw that attempt's parameters again.
    ostudy.sampler = make_sampler(t.sampler, trials=t.trials, seed=len(ostudy.trials))
    finished = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}

    def objective(trial: Any) -> float:
        params = {key: suggest(trial, key, p) for key, p in variant.tune.items()}
        data = study.resolve(variant, seed, params)
        folder = study.out / "tuning" / variant.name / f"trial{trial.number}__{config_hash(data)}"
        print(f"\ntuning {variant.name}: trial {trial.number + 1}/{t.trials} {params} -> {folder}", flush=True)

        def report(step: int, validation_metrics: Any) -> None:
            value = validation_metrics().get(t.metric)
            if value is None or not math.isfinite(value):
                return
            trial.report(float(value), step)
            if trial.should_prune():
                print(
                    f"tuning {variant.name}: trial {trial.number + 1} pruned at step {step} ({t.metric} = {value:.4g})",
                    flush=True,
                )
                raise optuna.TrialPruned(f"step {step}: {t.metric} = {value:.4g}")

        if not (folder / "metrics.json").is_file():
            try:
                train_run({**data, "output_dir": str(folder)}, on_evaluate=report if t.pruner != "none" else None)
            finally:  # an ended trial is never resumed (a rerun starts new trials)
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

    left = t.trials - sum(tr.state in finished for tr in ostudy.trials)
    if left > 0:
        ostudy.optimize(objective, n_trials=left, catch=())
    if not cfg.keep_checkpoints:  # also those of trials killed in an earlier attempt
        for folder in (study.out / "tuning" / variant.name).glob("trial*"):
            drop_checkpoints(folder)
    complete = [tr for tr in ostudy.trials if tr.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UserError(f"tuning {variant.name!r}: no trial completed (all {len(ostudy.trials)} pruned or failed)")
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
            }
            for tr in ostudy.trials
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
