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
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

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
