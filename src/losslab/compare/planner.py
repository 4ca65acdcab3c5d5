"""``losslab compare STUDY.yaml --plan --effect E``: how many seeds and test examples a study
needs to find a difference of E with 80 % power, from the variance components of a finished
pilot study, with the wall time at the pilot's measured per-run times.

Per metric, the seed, example and interaction variance components of each variant's paired
differences against the baseline (:func:`losslab.compare.stats.paired_interval`) are averaged
over the variants; the power of the study's own test (the generalized pivot at the study's
``stats.alpha``) at a seeds x examples design is simulated (:func:`losslab.compare.stats.simulated_power`).
More seeds cost training runs; more test examples cost only evaluation. See docs/compare.md,
"Planning a study".
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from losslab.compare.config import Study
from losslab.compare.examples import read_jsonl
from losslab.compare.results import analyze
from losslab.compare.runs import Run, plan, read_log
from losslab.compare.stats import simulated_power
from losslab.errors import UserError

TARGET = 0.8
SEEDS = (2, 3, 5, 10, 20, 50)
MAX_EXAMPLES_FACTOR = 1000


def finished_runs(study: Study) -> list[Run]:
    """Every run of the study, loaded; a ``UserError`` when the study has not been run or a run
    is unfinished (tuned variants: their best values from ``results.json``)."""
    where = study.source
    if not study.out.is_dir():
        raise UserError(
            f"the study has not been run: output_dir {str(study.out)!r} does not exist; a plan needs a finished "
            f"pilot study (run `losslab compare {where}` first)",
            where=where,
        )
    tuned: dict[str, Any] = {}
    results = study.out / "results.json"
    if results.is_file():
        saved = json.loads(results.read_text(encoding="utf-8"))
        tuned = {name: e["tuned"] for name, e in saved.get("variants", {}).items() if e.get("tuned")}
    runs = plan(study, tuned)
    unfinished = [r for r in runs if not r.done]
    if unfinished:
        raise UserError(
            f"the study is not finished: {len(unfinished)} of {len(runs)} runs have no metrics.json "
            f"(first: {unfinished[0].dir}); a plan needs a finished pilot study (run `losslab compare {where}`)",
            where=where,
        )
    return [r.load() for r in runs]


def run_seconds(run: Run) -> dict[str, float]:
    """A finished run's measured time: ``train`` (the Trainer's ``train_runtime`` in log.jsonl),
    ``total`` (config.yaml written at the start to metrics.json at the end, by modification
    time), ``evaluate`` (the rest: loading and the final evaluation) and ``examples`` (the saved
    outputs of that evaluation, every split)."""
    train = next((row["train_runtime"] for row in reversed(read_log(run.dir)) if "train_runtime" in row), None)
    total = (run.dir / "metrics.json").stat().st_mtime - (run.dir / "config.yaml").stat().st_mtime
    train = float(train) if train is not None else total
    saved = [p for pattern in ("generations_*.jsonl", "predictions_*.jsonl") for p in run.dir.glob(pattern)]
    return {
        "train": train,
        "total": max(total, train),
        "evaluate": max(total - train, 0.0),
        "examples": float(sum(len(read_jsonl(p)) for p in saved)),
    }


def plan_study(study: Study, effect: float, relative: bool) -> dict[str, Any]:
    """The plan of every metric of a finished study (see the module docstring)."""
    runs = finished_runs(study)
    results = analyze(study, runs)
    alpha = study.config.stats.alpha
    seeds0 = len(study.config.seeds)
    times = [run_seconds(r) for r in runs]
    train_s = statistics.median(t["train"] for t in times)
    out: dict[str, Any] = {"alpha": alpha, "target": TARGET, "variants": len(study.config.variants), "metrics": {}}
    per_example_s = [t["evaluate"] / t["examples"] for t in times if t["examples"]]
    base = results["variants"][results["study"]["baseline"]]
    for metric in study.config.metrics:
        intervals = [
            e["vs_baseline"][metric.name]["interval"]
            for e in results["variants"].values()
            if metric.name in e["vs_baseline"]
        ]
        if not intervals:
            continue
        baseline_mean = base["metrics"][metric.name]["mean"]
        delta = effect * abs(baseline_mean) if relative and baseline_mean is not None else effect
        examples0 = int(intervals[0]["n_examples"] or 1)
        comps = {
            k: statistics.fmean(i[k] or 0.0 for i in intervals) for k in ("seed_var", "example_var", "interaction_var")
        }
        seed_only = intervals[0]["values"] == "seeds"
        eval_s = statistics.median(per_example_s) if per_example_s else 0.0
        rows = []
        for seeds in sorted({*SEEDS, max(seeds0, 2)}):
            if seed_only:
                n, p = examples0, _seeds_power(delta, comps["seed_var"], seeds, alpha)
                reached = p >= TARGET
            else:
                n, p, reached = _examples_needed(delta, comps, seeds, examples0, alpha)
            train_h = study_variants(study) * max(seeds - seeds0, 0) * train_s / 3600
            eval_h = study_variants(study) * seeds * n * eval_s / 3600
            rows.append(
                {
                    "seeds": seeds,
                    "examples": n if reached else None,
                    "power": p,
                    "train_hours": train_h,
                    "evaluate_hours": eval_h if reached else None,
                }
            )
        grid_examples = [examples0 * k for k in (1, 2, 4, 8)] if not seed_only else [examples0]
        grid = {
            seeds: [
                _seeds_power(delta, comps["seed_var"], seeds, alpha)
                if seed_only
                else simulated_power(
                    delta, comps["seed_var"], comps["example_var"], comps["interaction_var"], seeds, n, alpha=alpha
                )
                for n in grid_examples
            ]
            for seeds in sorted({*SEEDS, max(seeds0, 2)})
        }
        out["metrics"][metric.name] = {
            "effect": delta,
            "relative": effect if relative else None,
            "baseline_mean": baseline_mean,
            "pilot": {"seeds": seeds0, "examples": examples0, "values": intervals[0]["values"]},
            "components": comps,
            "rows": rows,
            "grid_examples": grid_examples,
            "grid": grid,
            "train_seconds_per_run": train_s,
            "evaluate_seconds_per_example": eval_s,
        }
    return out


def study_variants(study: Study) -> int:
    return len(study.config.variants)


def _seeds_power(delta: float, seed_var: float, seeds: int, alpha: float) -> float:
    """Power of the t test over ``seeds`` seed-level differences of variance ``seed_var``."""
    from scipy.stats import nct
    from scipy.stats import t as t_dist

    if seed_var <= 0:
        return 1.0
    crit = float(t_dist.ppf(1 - alpha / 2, seeds - 1))
    ncp = delta / math.sqrt(seed_var / seeds)
    p = float(nct.sf(crit, seeds - 1, ncp) + nct.cdf(-crit, seeds - 1, ncp))
    return p if math.isfinite(p) else 1.0  # (scipy gives NaN far in the tail)


def _examples_needed(
    delta: float, comps: dict[str, float], seeds: int, examples0: int, alpha: float
) -> tuple[int, float, bool]:
    """The fewest test examples reaching the target power with ``seeds`` seeds (bisection on
    the simulated power), its power, and whether the target is reachable at all within
    ``MAX_EXAMPLES_FACTOR`` times the pilot's examples (seed noise alone may prevent it)."""

    def pw(n: int) -> float:
        return simulated_power(
            delta, comps["seed_var"], comps["example_var"], comps["interaction_var"], seeds, n, alpha=alpha
        )

    high = max(examples0, 2) * MAX_EXAMPLES_FACTOR
    top = pw(high)
    if top < TARGET:
        return high, top, False
    low = 2
    if pw(low) >= TARGET:
        return low, pw(low), True
    while high - low > max(1, low // 50):  # to 2 %
        mid = (low + high) // 2
        if pw(mid) >= TARGET:
            high = mid
        else:
            low = mid
    return high, pw(high), True


def format_plan(plan: dict[str, Any], source: str) -> str:
    """The plan as Markdown tables, one section per metric."""
    lines = [
        f"## losslab compare --plan: {source}",
        "",
        (
            f"Power {round(plan['target'] * 100)} % at alpha {plan['alpha']} (two-sided), the study's own test over "
            f"seeds x test examples; {plan['variants']} variants. More seeds cost training (every variant trains "
            "each new seed); more test examples cost only evaluation (of every run)."
        ),
    ]
    for name, m in plan["metrics"].items():
        c = m["components"]
        what = f"{m['relative'] * 100:g} % of the baseline's {m['baseline_mean']:.4g} = " if m["relative"] else ""
        lines += [
            "",
            f"### {name}: effect {what}{m['effect']:.4g}",
            "",
            (
                f"Pilot: {m['pilot']['seeds']} seeds x {m['pilot']['examples']} test examples; variance components "
                f"(mean over variants) seed {c['seed_var']:.4g}, example {c['example_var']:.4g}, "
                f"interaction {c['interaction_var']:.4g}; per run {m['train_seconds_per_run'] / 60:.1f} min training, "
                f"{m['evaluate_seconds_per_example']:.3g} s evaluation per test example."
            ),
        ]
        if m["pilot"]["values"] == "seeds":
            lines.append("(No per-example values for this metric: the plan is over seeds at the pilot's test set.)")
        lines += [
            "",
            "| seeds | test examples needed | power | training (new seeds) | evaluation (all runs) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in m["rows"]:
            if m["pilot"]["values"] == "seeds":
                lines.append(
                    f"| {r['seeds']} | the pilot's | {r['power'] * 100:.0f} % | {_hours(r['train_hours'])} | - |"
                )
            elif r["examples"] is None:
                lines.append(
                    f"| {r['seeds']} | not reachable (seed noise: {r['power'] * 100:.0f} % at most) | - | - | - |"
                )
            else:
                lines.append(
                    f"| {r['seeds']} | {r['examples']} | {r['power'] * 100:.0f} % | {_hours(r['train_hours'])} | "
                    f"{_hours(r['evaluate_hours'])} |"
                )
        lines += [
            "",
            "Power by seeds (rows) x test examples (columns):",
            "",
            "| seeds | " + " | ".join(str(n) for n in m["grid_examples"]) + " |",
            "|---:|" + "---:|" * len(m["grid_examples"]),
        ]
        for seeds, powers in m["grid"].items():
            lines.append(f"| {seeds} | " + " | ".join(f"{p * 100:.0f} %" for p in powers) + " |")
    return "\n".join(lines)


def _hours(h: float) -> str:
    return f"{h:.1f} h" if h >= 1 else f"{h * 60:.0f} min"


def run_plan(study: Study, effect: tuple[float, bool]) -> int:
    plan_ = plan_study(study, *effect)
    print(format_plan(plan_, Path(study.source).name))
    return 0
