"""Statistics of a study over seeds: per-variant summaries (:func:`summarize`: mean, sample
standard deviation, percentile-bootstrap CI of the mean) and the paired sign-flip permutation
test of a variant against the baseline (:func:`sign_flip_test`, exact up to 16 seeds).

How to read them (the bootstrap CI with few seeds, the test's smallest p-value, 6 seeds for
0.05): docs/compare.md, "Statistics". The paired bootstrap over test examples is in
:mod:`losslab.eval.bootstrap` and :mod:`losslab.compare.examples`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import t as t_dist

EXACT_MAX_SEEDS = 16


@dataclass(frozen=True)
class Summary:
    """A metric over seeds: n, mean, std (ddof 1; 0 for one seed), CI of the mean."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(
    values: Sequence[float | None], *, confidence: float = 0.95, n_bootstrap: int = 2000, seed: int = 0
) -> Summary:
    """Mean, std and percentile-bootstrap CI of the mean of ``values`` (None and NaN entries dropped)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan)
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_bootstrap, len(x)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return Summary(len(x), mean, std, float(lo), float(hi))


@dataclass(frozen=True)
class PairedTest:
    """A variant against the baseline on one metric, paired by seed."""

    n: int
    mean_diff: float
    diffs: list[float]
    p_value: float
    method: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def sign_flip_test(diffs: Sequence[float | None], *, seed: int = 0) -> PairedTest:
    """Two-sided paired sign-flip permutation test of mean(diffs) = 0 (exact for n <= 16; None and NaN
    entries dropped).

    ``diffs[s] = variant_s - baseline_s`` (same seed: same data order and head initialisation);
    under H0 each ``d_s`` is as likely to be ``+d_s`` as ``-d_s``, so
    ``p = #{signs : |mean(sign * d)| >= |mean(d)|} / 2^n`` over all ``2^n`` sign patterns (the
    smallest possible value is ``2 / 2^n``). Above 16 seeds, 2^16 random sign patterns are drawn
    (seeded; ``p = (1 + extreme) / (1 + 2^16)``, never 0)."""
    d = np.asarray([v for v in diffs if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(d)
    if n == 0:
        return PairedTest(0, float("nan"), [], float("nan"), "none")
    observed = abs(d.mean())
    if n <= EXACT_MAX_SEEDS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # (2^n, n)
        method = "exact sign-flip permutation"
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(1 << EXACT_MAX_SEEDS, n))
        method = "sign-flip permutation (65536 random)"
    null = np.abs(signs @ d / n)
    # Tolerance: a pattern equal to the observed one in exact arithmetic must count.
    extreme = int(np.sum(null >= observed - 1e-12 * max(1.0, observed)))
    p = (
        extreme / len(signs) if n <= EXACT_MAX_SEEDS else (1 + extreme) / (1 + len(signs))
    )  # the observed signs may not be drawn
    return PairedTest(n, float(d.mean()), d.tolist(), p, method)


def improvement(mean_diff: float, direction: str) -> float:
    """``mean_diff`` signed so that positive means better (``direction`` max or min)."""
    return mean_diff if direction == "max" else -mean_diff


def significance_mark(p_value: float | None, better: float, alpha: float) -> str:
    """'▲' significantly better, '▼' significantly worse, '' otherwise (``better``: signed improvement)."""
    if p_value is None or not math.isfinite(p_value) or p_value >= alpha or better == 0:
        return ""
    return "▲" if better > 0 else "▼"


# --- Two-level paired analysis: seeds x test examples --------------------------------------------


@dataclass(frozen=True)
class PairedInterval:
    """Interval of the population mean of paired differences over seeds x test examples.

    ``seed_var``, ``example_var``, ``interaction_var``: the variance components (sigma_a^2,
    sigma_b^2, sigma_e^2) of ``d[s, n] = mu + a_s + b_n + e_sn``; ``seed_share``,
    ``example_share``, ``interaction_share``: their shares of ``se**2``, the estimated variance
    of the mean (they sum to 1); ``n_examples``: the test examples, or the clusters when the
    analysis is clustered; ``df``: the Satterthwaite degrees of freedom of ``se`` (for reading
    only: the interval and ``p_value`` are the generalized ones, see :func:`generalized_interval`)."""

    mean: float
    low: float
    high: float
    se: float
    df: float
    p_value: float
    seed_share: float
    example_share: float
    interaction_share: float
    seed_var: float
    example_var: float
    interaction_var: float
    n_seeds: int
    n_examples: int
    method: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


CROSSED = "crossed random effects, generalized pivot"
PIVOT_DRAWS = 10_000


def sums_of_squares(diffs: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(grand mean, SS_A, SS_B, SS_E) of ``diffs`` (..., S, N), vectorised over the leading axes:
    ``SS_A = N sum_s (dbar_s. - dbar)^2`` (seeds, S - 1 df), ``SS_B = S sum_n (dbar_.n - dbar)^2``
    (examples, N - 1 df), ``SS_E`` the residual ((S - 1)(N - 1) df)."""
    d = np.asarray(diffs, dtype=np.float64)
    s, n = d.shape[-2], d.shape[-1]
    grand = d.mean(axis=(-2, -1))
    row, col = d.mean(axis=-1), d.mean(axis=-2)
    ss_a = n * ((row - grand[..., None]) ** 2).sum(-1)
    ss_b = s * ((col - grand[..., None]) ** 2).sum(-1)
    resid = d - row[..., :, None] - col[..., None, :] + grand[..., None, None]
    return grand, ss_a, ss_b, (resid**2).sum(axis=(-2, -1))


def components(ss_a: ArrayLike, ss_b: ArrayLike, ss_e: ArrayLike, seeds: int, examples: int) -> dict[str, np.ndarray]:
    """ANOVA estimates of the variance components from the sums of squares (S, N >= 2), each
    truncated at 0: ``seed_var = (MS_A - MS_E) / N``, ``example_var = (MS_B - MS_E) / S``,
    ``interaction_var = MS_E``; ``var = seed_var / S + example_var / N + interaction_var / (S N)``,
    the variance of the grand mean, and its Satterthwaite ``df``."""
    s, n = seeds, examples
    ms_a, ms_b = np.asarray(ss_a) / (s - 1), np.asarray(ss_b) / (n - 1)
    ms_e = np.asarray(ss_e) / ((s - 1) * (n - 1))
    use_a, use_b = ms_a > ms_e, ms_b > ms_e
    seed_var = np.where(use_a, (ms_a - ms_e) / n, 0.0)
    example_var = np.where(use_b, (ms_b - ms_e) / s, 0.0)
    c_a, c_b = use_a.astype(np.float64), use_b.astype(np.float64)
    c_e = 1.0 - c_a - c_b  # s n var = c_a MS_A + c_b MS_B + c_e MS_E
    total = c_a * ms_a + c_b * ms_b + c_e * ms_e
    denom = (c_a * ms_a) ** 2 / (s - 1) + (c_b * ms_b) ** 2 / (n - 1) + (c_e * ms_e) ** 2 / ((s - 1) * (n - 1))
    safe = np.where(denom > 0, denom, 1.0)
    df = np.where(denom > 0, total**2 / safe, float((s - 1) * (n - 1)))
    return {
        "seed_var": seed_var,
        "example_var": example_var,
        "interaction_var": ms_e,
        "var": total / (s * n),
        "df": df,
    }


def pivot_draws(seeds: int, examples: int, draws: int = PIVOT_DRAWS, seed: int = 0) -> np.ndarray:
    """(4, draws): the chi-square variables U_A, U_B, U_E (S - 1, N - 1, (S - 1)(N - 1) df) and
    the standard normal Z of the generalized pivot, seeded."""
    rng = np.random.default_rng(seed)
    s, n = seeds, examples
    return np.stack(
        [
            rng.chisquare(s - 1, draws),
            rng.chisquare(n - 1, draws),
            rng.chisquare((s - 1) * (n - 1), draws),
            rng.standard_normal(draws),
        ]
    )


def generalized_interval(
    grand: ArrayLike,
    ss_a: ArrayLike,
    ss_b: ArrayLike,
    ss_e: ArrayLike,
    seeds: int,
    examples: int,
    *,
    confidence: float = 0.95,
    draws: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, p_value) of the grand mean of a crossed seeds x examples design from its sums
    of squares (any leading shape), by the generalized pivotal quantity (Weerahandi 1993):

    ``R = dbar - Z sqrt(v_a / S + v_b / N + v_e / (S N))`` with ``v_e = SS_E / U_E``,
    ``v_a = max(0, SS_A / U_A - v_e) / N``, ``v_b = max(0, SS_B / U_B - v_e) / S`` for independent
    ``U_A ~ chi2(S - 1)``, ``U_B ~ chi2(N - 1)``, ``U_E ~ chi2((S - 1)(N - 1))``, ``Z ~ N(0, 1)``
    (:func:`pivot_draws`, seeded). The interval is the central ``confidence`` share of R's draws;
    ``p = 2 min(P(R <= 0), P(R >= 0))`` (with the +1 of a Monte Carlo p-value, at most 1)."""
    pivot = _pivot(grand, ss_a, ss_b, ss_e, seeds, examples, pivot_draws(seeds, examples) if draws is None else draws)
    tail = (1 - confidence) / 2
    low, high = np.quantile(pivot, [tail, 1 - tail], axis=-1)
    return low, high, _pivot_p(pivot)


def _pivot(
    grand: ArrayLike, ss_a: ArrayLike, ss_b: ArrayLike, ss_e: ArrayLike, s: int, n: int, u: np.ndarray
) -> np.ndarray:
    """The draws of R (..., draws) (:func:`generalized_interval`)."""
    ss = [np.asarray(x, dtype=np.float64)[..., None] for x in (ss_a, ss_b, ss_e)]
    v_e = ss[2] / u[2]
    var = (np.maximum(0.0, ss[0] / u[0] - v_e) + np.maximum(0.0, ss[1] / u[1] - v_e) + v_e) / (s * n)
    return np.asarray(grand, dtype=np.float64)[..., None] - u[3] * np.sqrt(var)


def _pivot_p(pivot: np.ndarray) -> np.ndarray:
    below, above = (pivot <= 0).sum(-1), (pivot >= 0).sum(-1)
    return np.minimum(1.0, 2 * (1 + np.minimum(below, above)) / (pivot.shape[-1] + 1))


def cluster_units(diffs: ArrayLike, clusters: Sequence[object]) -> np.ndarray:
    """(S, N) differences -> (S, G) per-cluster pseudo-values whose mean over clusters is each
    seed's mean over examples: ``y_sg = dbar_s + (G / N) (T_sg - N_g dbar_s)`` with ``T_sg`` the
    sum of seed s's differences over the ``N_g`` examples of cluster g. With one seed, the
    variance of their mean is the cluster-robust (CR1) variance of the mean over examples."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(clusters) != d.shape[1]:
        raise ValueError(f"{len(clusters)} cluster labels for {d.shape[1]} examples")
    labels = list(dict.fromkeys(clusters))
    index = {c: i for i, c in enumerate(labels)}
    member = np.zeros((d.shape[1], len(labels)))
    member[np.arange(d.shape[1]), [index[c] for c in clusters]] = 1.0
    totals = d @ member  # (S, G)
    row = d.mean(axis=1, keepdims=True)
    return row + len(labels) / d.shape[1] * (totals - member.sum(axis=0)[None, :] * row)


def paired_interval(
    diffs: ArrayLike, *, confidence: float = 0.95, clusters: Sequence[object] | None = None
) -> PairedInterval:
    """Interval of the mean variant-minus-baseline difference that holds seed and example noise.

    ``diffs`` (S, N): the difference of a per-example value for seed s and test example n (the
    same examples for every seed; a seed with a non-finite value is dropped). (S,) or (S, 1):
    seed-level values only. ``clusters``: a label per example; the examples of one cluster
    (turns of one conversation) then count as one unit (:func:`cluster_units`).

    S >= 2 and N >= 2: the generalized pivot of the crossed design (:func:`generalized_interval`),
    the variance split from :func:`components`. One seed: the t interval over examples (N - 1
    df); one example: over seeds (S - 1 df). ``p_value``: two-sided, of a zero mean."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    if d.ndim != 2:
        raise ValueError(f"diffs must be (seeds, examples); got shape {d.shape}")
    d = d[np.isfinite(d).all(axis=1)]
    if clusters is not None and d.size:
        d = cluster_units(d, clusters)
    s, n = d.shape
    nan = float("nan")
    if s * n < 2:
        mean = float(d.mean()) if d.size else nan
        return _interval([mean] + [nan] * 11, s, n, "none")
    suffix = f", clustered ({n} clusters)" if clusters is not None else ""
    if s >= 2 and n >= 2:
        grand, ss_a, ss_b, ss_e = sums_of_squares(d)
        c = components(ss_a, ss_b, ss_e, s, n)
        low, high, p = generalized_interval(grand, ss_a, ss_b, ss_e, s, n, confidence=confidence)
        var = float(c["var"])
        parts = [float(c["seed_var"]) / s, float(c["example_var"]) / n, float(c["interaction_var"]) / (s * n)]
        shares = [x / var if var > 0 else nan for x in parts]
        comps = [float(c["seed_var"]), float(c["example_var"]), float(c["interaction_var"])]
        numbers = [float(grand), float(low), float(high), math.sqrt(var), float(c["df"]), float(p), *shares, *comps]
        return _interval(numbers, s, n, CROSSED + suffix)
    flat = d.ravel()
    mean, var_one, df = float(flat.mean()), float(flat.var(ddof=1)), flat.size - 1
    se = math.sqrt(var_one / flat.size)
    half = float(t_dist.ppf(0.5 + confidence / 2, df)) * se
    p_t = float(2 * t_dist.sf(abs(mean) / se, df)) if se > 0 else (1.0 if mean == 0 else 0.0)
    if n == 1:  # one value per seed: the test set is fixed, only the seeds vary
        shares, comps, method = [1.0, 0.0, 0.0], [var_one, nan, nan], "t over seeds (one value per seed)"
    else:
        shares, comps, method = [nan, nan, nan], [nan, var_one, nan], "t over test examples (one seed)"
    return _interval([mean, mean - half, mean + half, se, float(df), p_t, *shares, *comps], s, n, method + suffix)


def _interval(numbers: list[float], s: int, n: int, method: str) -> PairedInterval:
    """A PairedInterval from its 12 numbers in field order."""
    names = ["mean", "low", "high", "se", "df", "p_value", "seed_share", "example_share", "interaction_share"]
    names += ["seed_var", "example_var", "interaction_var"]
    return PairedInterval(**dict(zip(names, numbers)), n_seeds=s, n_examples=n, method=method)


def linearize(stats: ArrayLike, score_fn: Callable[[np.ndarray], float]) -> np.ndarray:
    """Per-example values of a corpus metric (N,) whose mean is the corpus score.

    ``stats`` (N, K): per-example sufficient statistics (BLEU's n-gram matches and lengths, a
    confusion-matrix row, ...), ``score_fn``: summed statistics (K,) -> score. First-order
    (delta-method) linearisation at the sum ``T``: ``x_n = f(T) + grad f(T) . (N s_n - T)``, the
    gradient by central differences (forward where a statistic is 0). A metric that is a mean of
    per-example scores gives those scores back."""
    s = np.asarray(stats, dtype=np.float64)
    s = s.reshape(len(s), -1)
    total = s.sum(axis=0)
    score = float(score_fn(total))
    grad = np.zeros(len(total))
    for k in range(len(total)):
        h = 1e-4 * max(abs(total[k]), 1.0)
        up = total.copy()
        up[k] += h
        if total[k] - h >= 0:
            down = total.copy()
            down[k] -= h
            grad[k] = (score_fn(up) - score_fn(down)) / (2 * h)
        else:
            grad[k] = (score_fn(up) - score) / h
    return np.asarray(score + (len(s) * s - total[None, :]) @ grad)


def holm(p_values: Sequence[float | None]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (None / NaN entries stay NaN and do
    not count in the family): with the m finite p-values sorted, ``p_(1) <= ... <= p_(m)``,
    ``adj_(k) = min(1, max_{j <= k} (m - j + 1) p_(j))``. Rejecting ``adj < alpha`` controls the
    family-wise error rate at alpha under any dependence."""
    p = np.array([float("nan") if v is None else float(v) for v in p_values], dtype=np.float64)
    out = np.full(len(p), np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if m:
        order = finite[np.argsort(p[finite], kind="stable")]
        out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return [float(v) for v in out]


@dataclass(frozen=True)
class Improvement:
    """P(variant > baseline) over pairs of runs (rliable's probability of improvement) and its
    bootstrap interval."""

    value: float
    low: float
    high: float
    n_variant: int
    n_baseline: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def probability_of_improvement(
    variant: Sequence[float | None],
    baseline: Sequence[float | None],
    *,
    direction: str = "max",
    confidence: float = 0.95,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> Improvement:
    """``P(X > Y) = 1 / (n m) sum_i sum_j S(x_i, y_j)``, ``S`` 1 when x_i is better than y_j, 1/2
    on a tie, 0 otherwise (Agarwal et al. 2021: the Mann-Whitney U statistic over the n x m
    pairs of runs; ``direction`` min: lower is better); the interval: percentile bootstrap
    resampling the variant's and the baseline's runs independently (rliable's stratified
    bootstrap with one task). None / NaN entries dropped."""
    x = np.asarray([v for v in variant if v is not None and math.isfinite(v)], dtype=np.float64)
    y = np.asarray([v for v in baseline if v is not None and math.isfinite(v)], dtype=np.float64)
    nan = float("nan")
    if not len(x) or not len(y):
        return Improvement(nan, nan, nan, len(x), len(y))
    if direction == "min":
        x, y = -x, -y
    wins = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])  # (n, m)
    rng = np.random.default_rng(seed)
    u, w = _counts(rng, len(x), n_bootstrap), _counts(rng, len(y), n_bootstrap)  # (B, n), (B, m)
    boot = np.einsum("bi,ij,bj->b", u, wins, w) / (len(x) * len(y))
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return Improvement(float(wins.mean()), float(lo), float(hi), len(x), len(y))


def _counts(rng: np.random.Generator, n: int, n_samples: int) -> np.ndarray:
    """(n_samples, n): how often each of n items is drawn in each resample."""
    idx = rng.integers(0, n, size=(n_samples, n)) + (np.arange(n_samples) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=n_samples * n).reshape(n_samples, n).astype(np.float64)


# --- Power ------------------------------------------------------------------------------------


def simulated_power(
    effect: float,
    seed_var: float,
    example_var: float,
    interaction_var: float,
    seeds: int,
    examples: int,
    *,
    alpha: float = 0.05,
    studies: int = 1000,
    draws: int = 1000,
    seed: int = 0,
) -> float:
    """The share of ``studies`` simulated seeds x examples studies with a true mean difference
    ``effect`` (normal components) in which the generalized test (:func:`generalized_interval`)
    rejects a zero difference at ``alpha``. The studies are drawn through their sufficient
    statistics (``dbar ~ N(effect, var)``, ``SS_A ~ (s_e + N s_a) chi2(S - 1)``,
    ``SS_B ~ (s_e + S s_b) chi2(N - 1)``, ``SS_E ~ s_e chi2((S - 1)(N - 1))``), from seeded
    uniforms, so a larger study reuses the same random numbers (common random numbers: the power
    grows smoothly with the study's size)."""
    from scipy.stats import chi2, norm

    s, n = seeds, examples
    rng = np.random.default_rng(seed)
    q = rng.random((4, studies))
    var = seed_var / s + example_var / n + interaction_var / (s * n)
    grand = effect + math.sqrt(var) * norm.ppf(q[0])
    ss_a = (interaction_var + n * seed_var) * chi2.ppf(q[1], s - 1)
    ss_b = (interaction_var + s * example_var) * chi2.ppf(q[2], n - 1)
    ss_e = interaction_var * chi2.ppf(q[3], (s - 1) * (n - 1))
    r = np.random.default_rng(seed + 1).random((4, draws))
    pivots = np.stack([chi2.ppf(r[0], s - 1), chi2.ppf(r[1], n - 1), chi2.ppf(r[2], (s - 1) * (n - 1)), norm.ppf(r[3])])
    return float(np.mean(_pivot_p(_pivot(grand, ss_a, ss_b, ss_e, s, n, pivots)) < alpha))
