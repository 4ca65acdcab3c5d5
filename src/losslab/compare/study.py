"""``losslab compare STUDY.yaml``: a study end to end (validate, tune if asked, run variants x seeds,
write results and report), and the command's handler.

Order: the whole study is validated first (every variant x seed config); then the tuned
variants' Optuna studies run on the validation split; then every variant x seed runs
(finished runs are skipped); then ``results.json``, ``report.html`` and a Markdown summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from losslab.compare.config import Study, load_study
from losslab.compare.report import markdown_summary, write_report
from losslab.compare.results import analyze, write_results
from losslab.compare.runs import execute, plan
from losslab.errors import UserError


def compare(study: Study) -> dict:
    """Run the study end to end; returns the results mapping."""
    study.out.mkdir(parents=True, exist_ok=True)
    tuning = {}
    if any(v.tune for v in study.config.variants):
        from losslab.compare.tuning import tune_all

        tuning = tune_all(study)
    tuned = {name: t["best_params"] for name, t in tuning.items()}
    runs = execute(plan(study, tuned), keep_checkpoints=study.config.keep_checkpoints)
    results = analyze(study, runs, tuning)
    write_results(results, study.out / "results.json")
    report = write_report(
        results, runs, study.out / "report.html", title=Path(study.source).stem, examples=study.config.examples
    )
    print()
    print(markdown_summary(results, report.resolve()))
    return results


def run_compare(args: argparse.Namespace) -> int:
    study = load_study(args.config, args.overrides)
    if args.plan or args.effect is not None:
        if args.effect is None:
            raise UserError("argument --plan: give the difference to find with --effect (e.g. --effect 2%)")
        if not args.plan:
            raise UserError("argument --effect: only with --plan (the plan of a finished study)")
        from losslab.compare.planner import run_plan

        return run_plan(study, args.effect)
    compare(study)
    return 0
