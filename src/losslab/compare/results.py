"""``results.json`` of a study (:func:`analyze`, :func:`write_results`): per variant, the per-seed
metrics with mean, std and CI; per metric, the paired tests against the baseline: over seeds
(sign-flip), over test examples (paired bootstrap) where the runs' outputs allow it, and the
two-level analysis over seeds x test examples (``interval``: :func:`losslab.compare.stats.paired_interval`)
with Holm-adjusted p-values (``p_adjusted``) and the probability of improvement. Non-finite
numbers are ``null``.

The file's layout: docs/compare.md, "results.json".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from losslab.compare.config import Study
from losslab.compare.examples import class_names, example_id, example_stats, kind, read_predictions
from losslab.compare.runs import Run, read_generations
from losslab.compare.stats import (
    holm,
    improvement,
    linearize,
    paired_interval,
    probability_of_improvement,
    sign_flip_test,
    significance_mark,
    summarize,
)
from losslab.files import write_atomic

EXAMPLE_METRICS = {"bleu", "chrf"}


def analyze(study: Study, runs: list[Run], tuning: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results.json mapping of finished ``runs``."""
    cfg = study.config
    by = {(r.variant, r.seed): r for r in runs}
    out: dict[str, Any] = {
        "study": {
            "baseline": cfg.baseline,
            "seeds": cfg.seeds,
            "metrics": [m.model_dump() for m in cfg.metrics],
            "confidence": cfg.stats.confidence,
            "alpha": cfg.stats.alpha,
            "n_bootstrap": cfg.stats.n_bootstrap,
            "frontiers": [f.model_dump() for f in cfg.frontiers],
            "primary_metrics": primary_metrics(study),
        },
        "variants": {},
        "tuning": tuning or {},
    }
    for variant in cfg.variants:
        entry: dict[str, Any] = {
            "overrides": variant.overrides,
            "tuned": (tuning or {}).get(variant.name, {}).get("best_params"),
            "runs": {str(s): str(by[variant.name, s].dir) for s in cfg.seeds},
            "metrics": {},
            "vs_baseline": {},
        }
        for metric in cfg.metrics:
            values = {s: _number(by[variant.name, s].metrics.get(metric.name)) for s in cfg.seeds}
            summary = summarize(
                list(values.values()), confidence=cfg.stats.confidence, n_bootstrap=cfg.stats.n_bootstrap
            )
            entry["metrics"][metric.name] = {"per_seed": {str(s): v for s, v in values.items()}, **summary.to_dict()}
            if variant.name != cfg.baseline:
                entry["vs_baseline"][metric.name] = _paired(study, by, variant.name, metric.name, metric.direction)
        out["variants"][variant.name] = entry
    adjust(out)
    return _finite(out)


def primary_metrics(study: Study) -> list[str]:
    """The metrics of the confirmatory family (``primary_metrics``; default: the first metric)."""
    return list(study.config.primary_metrics or [study.config.metrics[0].name])


def adjust(results: dict[str, Any]) -> None:
    """Holm over the family of (variant, primary metric) tests, and over each other metric's
    variants as a family of its own; sets ``p_adjusted``, ``family``, and the marks from the
    adjusted p-values (in place)."""
    study = results["study"]
    primary = study.get("primary_metrics") or [study["metrics"][0]["name"]]
    families: dict[str, list[dict[str, Any]]] = {}
    for entry in results["variants"].values():
        for metric, paired in entry["vs_baseline"].items():
            families.setdefault("primary" if metric in primary else metric, []).append(paired)
    for name, members in families.items():
        adjusted = holm([m.get("p_raw") for m in members])
        for paired, p in zip(members, adjusted):
            paired["family"] = "primary" if name == "primary" else "secondary"
            paired["p_adjusted"] = p
            better = improvement(paired["interval"]["mean"], paired["direction"])
            paired["significant"] = bool(math.isfinite(p) and p < study["alpha"])
            paired["mark"] = significance_mark(p, better, study["alpha"])
            paired["evidence"] = (
                ("better" if better > 0 else "worse") if paired["significant"] and better != 0 else "no evidence"
            )


def _baseline(study: Study) -> str:
    """The baseline variant's name (CompareConfig's validator sets it: None in the YAML means the first variant)."""
    baseline = study.config.baseline
    assert baseline is not None, "CompareConfig was not validated"
    return baseline


def _paired(study: Study, by: dict[tuple[str, int], Run], variant: str, metric: str, direction: str) -> dict[str, Any]:
    cfg = study.config
    baseline = _baseline(study)
    diffs = [_diff(by[variant, s].metrics.get(metric), by[baseline, s].metrics.get(metric)) for s in cfg.seeds]
    test = sign_flip_test(diffs)
    better = improvement(test.mean_diff, direction)
    result: dict[str, Any] = {
        **test.to_dict(),
        "better": better > 0,
        # the sign-flip test's verdict; `adjust` replaces both by the Holm-adjusted two-level test's
        "significant": bool(test.p_value < cfg.stats.alpha),
        "mark": significance_mark(test.p_value, better, cfg.stats.alpha),
        "p_value_sign_flip": test.p_value,
        "direction": direction,
    }
    split, _, name = metric.partition("/")
    per_seed = (
        generation_stats(study, by, variant, split, name)
        if name in EXAMPLE_METRICS
        else prediction_stats(study, by, variant, split, name) or generation_values(study, by, variant, split, name)
    )
    examples = _over_examples(study, per_seed[0], per_seed[1]) if per_seed else None
    if examples:
        result["examples"] = examples
    interval, source = _two_level(cfg.stats.confidence, per_seed if examples else None, diffs)
    result["interval"] = {**interval.to_dict(), "values": source}
    result["p_raw"] = interval.p_value
    values = {s: by[variant, s].metrics.get(metric) for s in cfg.seeds}
    base_values = {s: by[baseline, s].metrics.get(metric) for s in cfg.seeds}
    result["p_improvement"] = probability_of_improvement(
        [_number(v) for v in values.values()],
        [_number(v) for v in base_values.values()],
        direction=direction,
        confidence=cfg.stats.confidence,
        n_bootstrap=cfg.stats.n_bootstrap,
    ).to_dict()
    return result


def _two_level(confidence: float, per_seed: PerSeed | None, diffs: list[float | None]) -> tuple[Any, str]:
    """The interval over seeds x test examples from the per-example statistics of every seed
    (each run's corpus metric linearised: :func:`losslab.compare.stats.linearize`), or over the
    seed-level differences where there are none."""
    if per_seed is None:
        return paired_interval([d if d is not None else float("nan") for d in diffs], confidence=confidence), "seeds"
    rows, score_fn, clusters = per_seed
    matrix = np.stack([linearize(b, score_fn) - linearize(a, score_fn) for _, a, b in rows])  # (S, N)
    return paired_interval(matrix, confidence=confidence, clusters=clusters), "examples (linearised)"


PerSeed = tuple[list[tuple[list[Any], np.ndarray, np.ndarray]], Any, list[Any] | None]
"""Per seed (example keys, baseline stats (N, K), variant stats (N, K)), the score function of
summed statistics, and the examples' ``cluster`` labels (None when the records have none)."""


def _clusters(rows: list[dict[str, Any]]) -> list[Any] | None:
    """The ``cluster`` of every saved example, or None unless every one has one."""
    labels = [r.get("cluster") for r in rows]
    return None if not labels or any(c is None for c in labels) else [json.dumps(c) for c in labels]


def paired_generations(
    study: Study, by: dict[tuple[str, int], Run], variant: str, split: str
) -> list[tuple[list[Any], list[dict[str, Any]], list[dict[str, Any]]]] | None:
    """Per seed, the example keys (prompt, reference) and the baseline's and ``variant``'s saved
    generations; None when a run has none or their examples do not line up."""
    baseline = _baseline(study)
    out = []
    for seed in study.config.seeds:
        base = read_generations(by[baseline, seed].dir, split)
        other = read_generations(by[variant, seed].dir, split)
        keys = [(g.get("prompt"), g.get("reference")) for g in base]
        if not base or keys != [(g.get("prompt"), g.get("reference")) for g in other]:
            return None
        out.append((keys, base, other))
    return out


def generation_stats(
    study: Study, by: dict[tuple[str, int], Run], variant: str, split: str, metric: str
) -> PerSeed | None:
    """BLEU / chrF statistics of every seed's generations, baseline and variant; None when a run
    has no generations or the runs' examples do not line up."""
    from losslab.eval.generation import sentence_statistics

    seeds = paired_generations(study, by, variant, split)
    if seeds is None:
        return None
    per_seed = []
    for keys, base, other in seeds:
        refs = [g["reference"] for g in base]
        stats_a, score_fn = sentence_statistics([g["hypothesis"] for g in base], refs, metric=metric)  # type: ignore[arg-type]
        stats_b, _ = sentence_statistics([g["hypothesis"] for g in other], refs, metric=metric)  # type: ignore[arg-type]
        per_seed.append((keys, stats_a, stats_b))
    return per_seed, score_fn, _clusters(seeds[-1][1])


def generation_values(
    study: Study, by: dict[tuple[str, int], Run], variant: str, split: str, metric: str
) -> PerSeed | None:
    """A metric that is the mean of a per-reply value saved with every generation under the
    metric's own name (the preference task's ``reward`` and ``kl``); None when a run has no
    generations, a row lacks the value, or the runs' examples do not line up."""
    seeds = paired_generations(study, by, variant, split)
    if seeds is None:
        return None
    per_seed = []
    for keys, base, other in seeds:
        try:
            a, b = ([float(g[metric]) for g in rows] for rows in (base, other))
        except (KeyError, TypeError, ValueError):
            return None
        ones = np.ones(len(a))
        per_seed.append((keys, np.stack([a, ones], axis=1), np.stack([b, ones], axis=1)))
    return per_seed, _mean_of_values, _clusters(seeds[-1][1])


def _mean_of_values(total: np.ndarray) -> float:
    return float(total[0] / total[1])


def prediction_stats(
    study: Study, by: dict[tuple[str, int], Run], variant: str, split: str, metric: str
) -> PerSeed | None:
    """Per-example statistics of a classification-style metric from every seed's saved predictions;
    None when a run has no predictions, the runs' examples do not line up, or the metric is not
    built from per-example statistics (:func:`losslab.compare.examples.example_stats`)."""
    cfg = study.config
    baseline = _baseline(study)
    pairs = []
    for seed in cfg.seeds:
        base_run, other_run = by[baseline, seed], by[variant, seed]
        base, other = read_predictions(base_run.dir, split), read_predictions(other_run.dir, split)
        if not base or len(base) != len(other) or kind(base) != kind(other):
            return None
        pairs.append((base, other, base_run.metrics, other_run.metrics))
    names: list[str] = []
    if kind(pairs[0][0]) == "class":  # one class list for every run, so the statistics line up
        for base, other, base_metrics, other_metrics in pairs:
            for rows, metrics in ((base, base_metrics), (other, other_metrics)):
                names += [n for n in class_names(metrics, split, rows) if n not in names]
    per_seed = []
    score_fn = None
    for base, other, _, _ in pairs:
        keys = [example_id(r) for r in base]
        if keys != [example_id(r) for r in other]:
            return None
        a, b = example_stats(metric, base, names), example_stats(metric, other, names)
        if a is None or b is None:
            return None
        per_seed.append((keys, a[0], b[0]))
        score_fn = a[1]
    return per_seed, score_fn, _clusters(pairs[0][0])


def example_bootstrap(
    study: Study, by: dict[tuple[str, int], Run], variant: str, split: str, metric: str
) -> dict[str, Any] | None:
    """Paired bootstrap of a corpus metric over the split's examples (see :func:`_over_examples`);
    None when a run has no generations or the runs' examples do not line up."""
    per_seed = generation_stats(study, by, variant, split, metric)
    return _over_examples(study, per_seed[0], per_seed[1]) if per_seed else None


def prediction_bootstrap(
    study: Study, by: dict[tuple[str, int], Run], variant: str, split: str, metric: str
) -> dict[str, Any] | None:
    """Paired bootstrap of a classification-style metric over the split's saved predictions
    (see :func:`_over_examples`); None as :func:`prediction_stats`."""
    per_seed = prediction_stats(study, by, variant, split, metric)
    return _over_examples(study, per_seed[0], per_seed[1]) if per_seed else None


def _over_examples(
    study: Study, per_seed: list[tuple[list[Any], np.ndarray, np.ndarray]], score_fn: Any
) -> dict[str, Any] | None:
    """The paired bootstrap over test examples with every seed's outputs: each example's
    statistics are summed over the seeds (the corpus score is unchanged) and the N examples
    resampled, so an example counts once however many seeds saw it, not once per seed, which
    would narrow the interval about sqrt(seeds)-fold. None when the seeds' examples differ."""
    from losslab.eval.bootstrap import paired_bootstrap

    cfg = study.config
    if not per_seed or any(keys != per_seed[0][0] for keys, _, _ in per_seed):
        return None
    stats_a = np.sum([a.reshape(len(a), -1) for _, a, _ in per_seed], axis=0)
    stats_b = np.sum([b.reshape(len(b), -1) for _, _, b in per_seed], axis=0)
    result = paired_bootstrap(
        stats_a, stats_b, score_fn, n_samples=cfg.stats.n_bootstrap, seed=0, confidence=cfg.stats.confidence
    )
    return {
        **result.to_dict(),
        "n_examples": len(stats_a),
        "seeds_summed": len(per_seed),
        "significant": bool(result.p_value < cfg.stats.alpha),
    }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _diff(a: Any, b: Any) -> float | None:
    a, b = _number(a), _number(b)
    return None if a is None or b is None else a - b


def _finite(value: Any) -> Any:
    """Replace NaN and infinities by None everywhere (strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(results: dict[str, Any], path: Path) -> Path:
    write_atomic(path, json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return path
