"""``report.html`` (self-contained) and the Markdown summary of a study.

The page holds: the variants x metrics table (mean, 95% CI, significance marks against the
baseline from the Holm-adjusted two-level test), a forest plot per metric (each variant's
difference from the baseline with its interval, the per-seed differences as dots), the paired
tests side by side (interval, variance split, raw and adjusted p, P(improvement)), learning
curves of every loss term and of every weight that changes (from each run's ``log.jsonl``),
validation loss curves, the tuning history, and the outputs of every variant side by side for
a few test prompts. A results.json written before the two-level analysis still renders (its
tables as they were). Plots are matplotlib PNGs inlined as ``data:`` URIs;
everything that comes from data goes through jinja2's autoescape.
"""

from __future__ import annotations

import base64
import io
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from losslab.compare.examples import display, read_predictions
from losslab.compare.runs import Run, read_generations, read_log
from losslab.eval.report import format_markdown_table, format_value
from losslab.files import write_atomic


def _fmt(value: float | None, digits: int = 4) -> str:
    return format_value(value, digits) if value is not None else "-"


def metric_cell(stats: dict[str, Any], paired: dict[str, Any] | None) -> str:
    """``mean [lo, hi] mark`` for a table cell."""
    text = f"{_fmt(stats.get('mean'))} [{_fmt(stats.get('ci_low'))}, {_fmt(stats.get('ci_high'))}]"
    if paired:
        text += f" {paired['mark']}" if paired.get("mark") else ""
    return text


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the variants x metrics table."""
    metrics = [m["name"] for m in results["study"]["metrics"]]
    header = ["variant", *metrics]
    rows = []
    for name, entry in results["variants"].items():
        row = [name + (" (baseline)" if name == results["study"]["baseline"] else "")]
        row += [metric_cell(entry["metrics"][m], entry["vs_baseline"].get(m)) for m in metrics]
        rows.append(row)
    return header, rows


TEST_HEADER = [
    "variant",
    "metric",
    "mean diff",
    "per seed",
    "p (seeds)",
    "vs baseline",
    "test examples: delta [95% CI], p, n",
]


NEW_TEST_HEADER = [
    "variant",
    "metric",
    "difference [95% CI]",
    "variance: seeds / examples / rest",
    "p",
    "p adjusted (Holm)",
    "P(improvement) [95% CI]",
    "vs baseline",
    "per seed",
    "test examples: delta [95% CI], p, n",
]


def two_level(results: dict[str, Any]) -> bool:
    """Whether ``results`` has the two-level analysis (results.json from before it has not)."""
    return any("interval" in t for e in results["variants"].values() for t in e["vs_baseline"].values())


def verdict(paired: dict[str, Any]) -> str:
    """``better``, ``worse`` or ``equal`` in the metric's direction, with the significance mark;
    with the two-level analysis: ``better ▲`` / ``worse ▼`` where the adjusted test finds a
    difference, else ``no evidence``."""
    if paired.get("mean_diff") is None:
        return "-"
    if "evidence" in paired:
        return f"{paired['evidence']} {paired['mark']}".strip()
    word = "better" if paired["better"] else "equal" if paired["mean_diff"] == 0 else "worse"
    return f"{word} {paired['mark']}" if paired.get("mark") else word


def examples_cell(ex: dict[str, Any] | None) -> str:
    """The paired bootstrap over test examples: ``delta [lo, hi], p = ..., n = ...`` ('-' when none)."""
    if not ex:
        return "-"
    return (
        f"{_fmt(ex['delta'])} [{_fmt(ex['ci_low'])}, {_fmt(ex['ci_high'])}], p = {_fmt(ex['p_value'], 3)}, "
        f"n = {ex['n_examples']}"
    )


def interval_cell(t: dict[str, Any]) -> str:
    i = t["interval"]
    return f"{_fmt(i['mean'])} [{_fmt(i['low'])}, {_fmt(i['high'])}]"


def share_cell(i: dict[str, Any]) -> str:
    """``seeds / examples / rest`` shares of the variance of the mean, in per cent."""
    shares = [i.get("seed_share"), i.get("example_share"), i.get("interaction_share")]
    if any(x is None for x in shares):
        return "-"
    return " / ".join(f"{round(100 * x)}%" for x in shares)  # type: ignore[operator]


def improvement_cell(t: dict[str, Any]) -> str:
    pi = t.get("p_improvement") or {}
    if pi.get("value") is None:
        return "-"
    return f"{_fmt(pi['value'], 2)} [{_fmt(pi['low'], 2)}, {_fmt(pi['high'], 2)}]"


def test_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per variant x metric against the baseline). With the two-level
    analysis: the difference with its interval, the variance split, raw and Holm-adjusted p,
    P(improvement), the verdict, the per-seed differences and the test-example bootstrap.
    Before it: mean and per-seed differences, the seed-level p-value, the verdict with its mark,
    and the test-example bootstrap. The bootstrap column only when some metric has one."""
    rows = []
    if two_level(results):
        for name, entry in results["variants"].items():
            for metric, t in entry["vs_baseline"].items():
                adjusted = _fmt(t.get("p_adjusted"), 3)
                rows.append(
                    [
                        name,
                        metric + (" *" if t.get("family") == "primary" else ""),
                        interval_cell(t),
                        share_cell(t["interval"]),
                        _fmt(t.get("p_raw"), 3),
                        adjusted,
                        improvement_cell(t),
                        verdict(t),
                        ", ".join(_fmt(d) for d in t["diffs"]),
                        examples_cell(t.get("examples")),
                    ]
                )
        if all(r[-1] == "-" for r in rows):
            return NEW_TEST_HEADER[:-1], [r[:-1] for r in rows]
        return list(NEW_TEST_HEADER), rows
    for name, entry in results["variants"].items():
        for metric, t in entry["vs_baseline"].items():
            rows.append(
                [
                    name,
                    metric,
                    _fmt(t["mean_diff"]),
                    ", ".join(_fmt(d) for d in t["diffs"]),
                    _fmt(t["p_value"], 3),
                    verdict(t),
                    examples_cell(t.get("examples")),
                ]
            )
    if all(r[-1] == "-" for r in rows):
        return TEST_HEADER[:-1], [r[:-1] for r in rows]
    return list(TEST_HEADER), rows


def markdown_summary(results: dict[str, Any], report_path: Path | None = None) -> str:
    """The table and the paired tests as Markdown (printed at the end of ``losslab compare``)."""
    study = results["study"]
    header, rows = table_rows(results)
    conf = round(study["confidence"] * 100)
    new = two_level(results)
    test = (
        f"two-level test over seeds x test examples, Holm-adjusted p < {study['alpha']}"
        if new
        else f"paired sign-flip test over seeds, p < {study['alpha']}"
    )
    lines = [
        f"## losslab compare: {len(results['variants'])} variants x {len(study['seeds'])} seeds",
        "",
        (
            f"Mean over seeds [{conf}% bootstrap CI]; ▲/▼: significantly better/worse than "
            f"`{study['baseline']}` ({test})."
        ),
        "",
        format_markdown_table(header, rows),
        "",
    ]
    test_header, tests = test_rows(results)
    if tests:
        lines += [
            "Paired differences against the baseline (variant - baseline, per seed):",
            "",
            format_markdown_table(test_header, tests),
            "",
        ]
    if new:
        primary = ", ".join(study.get("primary_metrics") or [study["metrics"][0]["name"]])
        lines.append(
            f"Difference: variant - baseline, {conf}% interval holding seed and test-example noise; "
            f"* primary metrics ({primary}): Holm over every (variant, primary metric); each other metric "
            "is a family of its own. P(improvement): P(a variant run beats a baseline run)."
        )
    min_p = 2 / 2 ** len(study["seeds"])
    if not new and min_p >= study["alpha"]:
        lines.append(
            f"Note: with {len(study['seeds'])} seeds the exact sign-flip test cannot go below p = {min_p:.3g}; "
            "the paired bootstrap over test examples is the test with power here."
        )
    if report_path is not None:
        lines.append(f"\nreport: {report_path}")
    return "\n".join(lines)


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(n_panels: int) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def curves(runs: list[Run], key_filter: Callable[[dict[str, Any], str], bool], *, title: str) -> str | None:
    """One panel per logged key matching ``key_filter(row, key)``; a line per run, colour per variant."""
    series: dict[str, dict[tuple[str, int], tuple[list[float], list[float]]]] = defaultdict(dict)
    for run in runs:
        for row in read_log(run.dir):
            for key, value in row.items():
                if key_filter(row, key) and isinstance(value, (int, float)):
                    xs, ys = series[key].setdefault((run.variant, run.seed), ([], []))
                    xs.append(row.get("step", len(xs)))
                    ys.append(value)
    for key in [k for k in series if k.startswith(("weight/", "eval_weight/"))]:
        values = [v for _, ys in series[key].values() for v in ys]
        if max(values) - min(values) <= 1e-12 * max(1.0, abs(max(values))):  # a constant weight: a flat line
            del series[key]
    if not series:
        return None
    variants = list(dict.fromkeys(r.variant for r in runs))
    colours = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig, axes = _figure(len(series))
    for ax, (key, lines) in zip(axes, sorted(series.items())):
        seen = set()
        for (variant, _seed), (xs, ys) in lines.items():
            ax.plot(xs, ys, color=colours[variant], alpha=0.8, lw=1.2, label=None if variant in seen else variant)
            seen.add(variant)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def metric_bars(results: dict[str, Any]) -> str | None:
    """Mean and CI of every compared metric per variant, seeds as dots (points, not bars from
    zero: 0.65 and 0.69 would look alike)."""
    metrics = [m["name"] for m in results["study"]["metrics"]]
    names = list(results["variants"])
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        for i, name in enumerate(names):
            s = results["variants"][name]["metrics"][metric]
            if s["mean"] is None:
                continue
            ax.errorbar(
                i,
                s["mean"],
                yerr=[[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]],
                color=f"C{i % 10}",
                fmt="o",
                capsize=4,
            )
            seeds = [v for v in s["per_seed"].values() if v is not None]
            ax.scatter([i + 0.15] * len(seeds), seeds, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=7)
    return _png(fig)


def forest_plot(results: dict[str, Any]) -> str | None:
    """Per metric: each variant's difference from the baseline with its interval (filled where
    the adjusted test finds a difference, hollow where there is no evidence), the per-seed
    differences as grey dots, and the zero line. None without the two-level analysis."""
    if not two_level(results):
        return None
    study = results["study"]
    metrics = list(study["metrics"])
    others = [n for n in results["variants"] if n != study["baseline"]]
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        for y, name in enumerate(others):
            t = results["variants"][name]["vs_baseline"].get(metric["name"])
            if not t or "interval" not in t or t["interval"]["mean"] is None:
                continue
            i = t["interval"]
            colour = "C2" if t.get("evidence") == "better" else "C3" if t.get("evidence") == "worse" else "0.35"
            if i["low"] is not None and i["high"] is not None:
                ax.plot([i["low"], i["high"]], [y, y], color=colour, lw=2)
            ax.scatter(
                [i["mean"]],
                [y],
                s=46,
                zorder=3,
                facecolors=colour if t.get("significant") else "white",
                edgecolors=colour,
            )
            seeds = [d for d in t["diffs"] if d is not None]
            ax.scatter(seeds, [y - 0.18] * len(seeds), s=9, color="0.55", zorder=2)
        ax.axvline(0.0, color="k", lw=0.8, ls="--")
        ax.set_yticks(range(len(others)), others, fontsize=7)
        ax.set_ylim(-0.6, len(others) - 0.4)
        better = "right" if metric["direction"] == "max" else "left"
        ax.set_title(f"{metric['name']}: variant - baseline (better: {better})", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(
        "Differences from the baseline: interval (filled: adjusted test finds a difference), dots: per seed",
        fontsize=9,
    )
    return _png(fig)


def frontier_points(results: dict[str, Any], x: str, y: str) -> dict[str, list[tuple[float, float]]]:
    """Per variant, the (x, y) metric values of each seed where both are measured."""
    points = {}
    for name, entry in results["variants"].items():
        xs, ys = entry["metrics"][x]["per_seed"], entry["metrics"][y]["per_seed"]
        points[name] = [(xs[s], ys[s]) for s in xs if xs[s] is not None and ys.get(s) is not None]
    return points


def frontier_plot(results: dict[str, Any]) -> str | None:
    """Each ``frontiers`` entry of the study: metric y against metric x, a dot per seed and a
    cross at each variant's mean (e.g. reward against KL to the reference)."""
    frontiers = results["study"].get("frontiers") or []
    if not frontiers:
        return None
    fig, axes = _figure(len(frontiers))
    for ax, frontier in zip(axes, frontiers):
        x_name, y_name = frontier["x"], frontier["y"]
        for i, (name, points) in enumerate(frontier_points(results, x_name, y_name).items()):
            if not points:
                continue
            colour = f"C{i % 10}"
            ax.scatter([p[0] for p in points], [p[1] for p in points], color=colour, s=16, alpha=0.75, label=name)
            ax.scatter(
                [sum(p[0] for p in points) / len(points)],
                [sum(p[1] for p in points) / len(points)],
                color=colour,
                marker="x",
                s=60,
            )
        ax.set_xlabel(x_name, fontsize=8)
        ax.set_ylabel(y_name, fontsize=8)
        ax.set_title(f"{y_name} against {x_name} (dot: a seed; x: the mean)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    return _png(fig)


def tuning_plot(tuning: dict[str, Any]) -> str | None:
    """Trial values and best-so-far per tuned variant."""
    if not tuning:
        return None
    fig, axes = _figure(len(tuning))
    for ax, (name, study) in zip(axes, tuning.items()):
        done = [t for t in study["trials"] if t["value"] is not None]
        pruned = [t for t in study["trials"] if t["state"] == "PRUNED"]
        ax.scatter([t["number"] for t in done], [t["value"] for t in done], s=14, label="complete")
        if pruned:
            ax.scatter(
                [t["number"] for t in pruned],
                [t.get("last_intermediate") for t in pruned],
                marker="x",
                color="C3",
                label="pruned",
            )
        best, xs, ys = None, [], []
        for t in done:
            if best is None or (t["value"] < best if study["direction"] == "min" else t["value"] > best):
                best = t["value"]
            xs.append(t["number"])
            ys.append(best)
        ax.step(xs, ys, where="post", color="k", lw=1, label="best so far")
        ax.set_title(f"{name}: {study['metric']}", fontsize=9)
        ax.set_xlabel("trial", fontsize=8)
        ax.legend(fontsize=7)
    return _png(fig)


def reply(generation: dict[str, Any]) -> str:
    """A generated reply, with its per-reply scores (the preference task's reward and KL) when saved."""
    scores = ", ".join(
        f"{key} {generation[key]:.3g}" for key in ("reward", "kl") if isinstance(generation.get(key), (int, float))
    )
    return f"{generation['hypothesis']} ({scores})" if scores else str(generation["hypothesis"])


def example_table(runs: list[Run], seed: int, limit: int) -> tuple[list[str], list[dict[str, Any]]]:
    """Test inputs with the reference and every variant's output (one seed): the generations
    of generation tasks, else the saved predictions (:func:`losslab.compare.examples.display`)."""
    variants = list(dict.fromkeys(r.variant for r in runs))
    outputs: dict[str, list[tuple[str, str, str]]] = {}
    for r in runs:
        if r.seed != seed:
            continue
        gens = read_generations(r.dir, "test")
        if gens:
            outputs[r.variant] = [(g["prompt"], g.get("reference", ""), reply(g)) for g in gens]
        else:
            outputs[r.variant] = [display(row) for row in read_predictions(r.dir, "test")]
    first = next((o for o in outputs.values() if o), [])
    rows = []
    for i, (prompt, reference, _) in enumerate(first[:limit]):
        rows.append(
            {
                "prompt": prompt[-400:],
                "reference": reference,
                "replies": [outputs[v][i][2] if i < len(outputs.get(v, [])) else "" for v in variants],
            }
        )
    return variants, rows


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>losslab compare: {{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}
th{background:#f3f3f3}td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.up{color:#0a7d2c;font-weight:bold}.down{color:#b3261e;font-weight:bold}
pre{white-space:pre-wrap;margin:0;font-size:.85em;max-width:28em}img{max-width:100%}.note{color:#555;font-size:.9em}
</style></head><body>
<h1>losslab compare: {{ title }}</h1>
<p class="note">{{ variants|length }} variants x {{ seeds|length }} seeds ({{ seeds|join(", ") }}); baseline <b>{{ baseline }}</b>.
Cells: mean over seeds [{{ conf }}% percentile-bootstrap CI of the mean]. <span class="up">▲</span>/<span class="down">▼</span>:
{% if new %}significantly better/worse than the baseline (two-level test over seeds x test examples, Holm-adjusted p &lt; {{ alpha }});
no mark: no evidence of a difference.{% else %}significantly better/worse than the baseline (exact paired sign-flip test over seeds, p &lt; {{ alpha }}).{% endif %}
{% if not new and min_p >= alpha %}With {{ seeds|length }} seeds that test cannot go below p = {{ "%.3g"|format(min_p) }}, so no seed-level mark is possible;
the paired bootstrap over test examples below (generation and classification metrics) has the power.{% endif %}</p>
<h2>Results</h2>
<table id="results"><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in rows %}<tr><td>{{ row[0] }}</td>{% for cell in row[1:] %}<td class="num">{{ cell|replace("▲", "")|replace("▼", "") }}{% if "▲" in cell %}<span class="up">▲</span>{% elif "▼" in cell %}<span class="down">▼</span>{% endif %}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if bars %}<img alt="metrics per variant" src="{{ bars }}">{% endif %}
{% if tests %}<h2>Against the baseline</h2>
{% if forest %}<img alt="differences from the baseline" src="{{ forest }}">
<p class="note">Difference: variant - baseline, with the {{ conf }}% interval of the mean difference that holds both the
seed-to-seed and the test-example noise; the variance split says which of the two dominates (more seeds or more test
examples narrow it). p: the two-level test; adjusted: Holm over the primary metrics (*) x variants, and over each other
metric's variants. P(improvement): the probability that a run of the variant beats a run of the baseline. "no evidence":
the adjusted test does not find a difference (which is not evidence of no difference). docs/compare.md, "Statistics".</p>{% endif %}
<table id="tests"><tr>{% for h in test_header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for r in tests %}<tr>{% for c in r %}<td class="num">{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
<h2>Variants</h2><table id="variants"><tr><th>variant</th><th>overrides</th><th>tuned</th></tr>
{% for name, v in variants.items() %}<tr><td>{{ name }}</td><td><pre>{{ v.overrides|tojson(indent=1) }}</pre></td><td><pre>{{ v.tuned|tojson if v.tuned else "" }}</pre></td></tr>{% endfor %}</table>
{% for title, img in plots %}{% if img %}<h2>{{ title }}</h2><img alt="{{ title }}" src="{{ img }}">{% endif %}{% endfor %}
{% if examples %}<h2>Example outputs on the test split (seed {{ example_seed }})</h2>
<table id="examples"><tr><th>input</th><th>reference</th>{% for v in example_variants %}<th>{{ v }}</th>{% endfor %}</tr>
{% for e in examples %}<tr><td><pre>{{ e.prompt }}</pre></td><td><pre>{{ e.reference }}</pre></td>{% for r in e.replies %}<td><pre>{{ r }}</pre></td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
</body></html>
"""


def _is_train_term(row: dict[str, Any], key: str) -> bool:
    return "eval_loss" not in row and (key == "loss" or key.startswith(("loss/", "weight/")))


def _is_eval_term(row: dict[str, Any], key: str) -> bool:
    return key == "eval_loss" or key.startswith("eval_loss/")


def render_report(results: dict[str, Any], runs: list[Run], *, title: str, examples: int = 5) -> str:
    """The self-contained HTML page."""
    import jinja2

    env = jinja2.Environment(autoescape=True)
    study = results["study"]
    header, rows = table_rows(results)
    plots = [
        ("Frontiers", frontier_plot(results)),
        (
            "Training loss terms and weights",
            curves(
                runs,
                _is_train_term,
                title="training: total loss, every term, every weight that changes (a line per seed)",
            ),
        ),
        ("Validation curves", curves(runs, _is_eval_term, title="validation loss during training (a line per seed)")),
        ("Tuning history", tuning_plot(results.get("tuning") or {})),
    ]
    variants, example_rows = example_table(runs, study["seeds"][0], examples)
    test_header, tests = test_rows(results)
    return env.from_string(TEMPLATE).render(
        title=title,
        variants=results["variants"],
        seeds=study["seeds"],
        baseline=study["baseline"],
        conf=round(study["confidence"] * 100),
        alpha=study["alpha"],
        min_p=2 / 2 ** len(study["seeds"]),
        header=header,
        rows=rows,
        test_header=test_header,
        tests=tests,
        bars=metric_bars(results),
        forest=forest_plot(results),
        new=two_level(results),
        plots=plots,
        examples=example_rows,
        example_variants=variants,
        example_seed=study["seeds"][0],
    )


def write_report(results: dict[str, Any], runs: list[Run], path: Path, *, title: str, examples: int = 5) -> Path:
    write_atomic(path, render_report(results, runs, title=title, examples=examples))
    return path
