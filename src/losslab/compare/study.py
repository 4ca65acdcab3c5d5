"""``losslab compare STUDY.yaml``: a study end to end (validate, tune if asked, run variants x seeds,
write results and report), and the command's handler.

Order: the whole study is validated first (every variant x seed config), then the executor
(workers against the cores and GPUs, the Ray cluster); then the tuned variants' Optuna studies
run on the validation split; then every variant x seed runs (finished runs are skipped) on the
study's executor; then ``results.json``, ``report.html`` and a Markdown summary; last, the
models that ``keep_models`` does not keep are deleted. With ``--shard K/N`` only the K-th of N
shares of the runs is trained and no report is written (docs/scaling.md, "SLURM without Ray").
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from losslab.compare.config import Study, load_study
from losslab.compare.execution import Execution, check_execution, release
from losslab.compare.keep import keep_models
from losslab.compare.report import markdown_summary, write_report
from losslab.compare.results import analyze, write_results
from losslab.compare.runs import execute, plan
from losslab.errors import UserError


def compare(study: Study, shard: tuple[int, int] | None = None) -> dict:
    """Run the study end to end; returns the results mapping (``shard``: only train that share
    of the runs; returns an empty mapping)."""
    cfg = study.config
    if shard is not None and any(v.tune for v in cfg.variants):
        names = ", ".join(v.name for v in cfg.variants if v.tune)
        raise UserError(
            f"--shard: variant(s) {names} are tuned, and their runs depend on the tuning's result; "
            "run such a study in one job (processes or ray backend), or tune first and write the best "
            "values into the variants"
        )
    if cfg.execution.backend == "ray" and cfg.execution.ray_address and not Path(cfg.output_dir).is_absolute():
        raise UserError(
            f"field 'output_dir': {cfg.output_dir!r} is relative; on a Ray cluster give an absolute path on "
            "storage every worker sees (docs/scaling.md)",
            where=study.source,
        )
    study.out.mkdir(parents=True, exist_ok=True)
    try:  # before any run: nothing of a finished run is touched
        check_execution(cfg.execution)
    except UserError as exc:
        release(cfg.execution)  # a local Ray cluster started by the check, then refused
        line = study.lines.get(("execution",))
        where = exc.where or (f"{study.source}:{line}" if line else study.source)
        raise UserError(exc.message, where=where) from None
    try:
        tuning: dict[str, Any] = {}
        if any(v.tune for v in cfg.variants):
            from losslab.compare.tuning import tune_all

            tuning = tune_all(study)
        tuned = {name: t["best_params"] for name, t in tuning.items()}
        runs = execute(plan(study, tuned), keep_checkpoints=cfg.keep_checkpoints, execution=cfg.execution, shard=shard)
    finally:
        release(cfg.execution)
    if shard is not None:
        print(
            f"shard {shard[0]}/{shard[1]}: done; once every shard is, `losslab compare {study.source}` "
            "writes the results and the report"
        )
        return {}
    results = analyze(study, runs, tuning)
    write_results(results, study.out / "results.json")
    report = write_report(
        results, runs, study.out / "report.html", title=Path(study.source).stem, examples=cfg.examples
    )
    kept = keep_models(study, runs)
    print()
    print(markdown_summary(results, report.resolve()))
    if cfg.keep_models != "all":
        print(f"\nkeep_models: {cfg.keep_models}; kept: {', '.join(str(p / 'model') for p in kept) or 'none'}")
    return results


def with_execution_flags(study: Study, args: argparse.Namespace) -> Study:
    """``--backend``, ``--workers``, ``--ray-address`` replace the study's ``execution:`` fields."""
    flags: dict[str, Any] = {
        key: value
        for key, value in (
            ("backend", getattr(args, "backend", None)),
            ("workers", getattr(args, "workers", None)),
            ("ray_address", getattr(args, "ray_address", None)),
        )
        if value is not None
    }
    if flags:
        try:
            study.config.execution = Execution.model_validate({**study.config.execution.model_dump(), **flags})
        except ValidationError as exc:
            raise UserError(f"execution flags: {exc.errors()[0]['msg']}") from None
    return study


def run_compare(args: argparse.Namespace) -> int:
    study = with_execution_flags(load_study(args.config, args.overrides), args)
    if args.plan or args.effect is not None:
        if args.effect is None:
            raise UserError("argument --plan: give the difference to find with --effect (e.g. --effect 2%)")
        if not args.plan:
            raise UserError("argument --effect: only with --plan (the plan of a finished study)")
        from losslab.compare.planner import run_plan

        return run_plan(study, args.effect)
    compare(study, shard=getattr(args, "shard", None))
    return 0
