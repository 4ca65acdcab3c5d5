"""Seeded paired bootstrap over test examples (:func:`paired_bootstrap`) for corpus metrics
computed from summed per-example statistics (BLEU's n-gram counts, confusion-matrix cells, ...).

What it reports and where it departs from sacrebleu's ``--paired-bs``: docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from losslab.eval._arrays import ArrayLike, as_float_array
from losslab.eval.report import namespace


@dataclass(frozen=True)
class PairedBootstrapResult:
    """Scores of systems A (baseline) and B, their difference and its significance."""

    score_a: float
    score_b: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    win_rate: float
    n_samples: int
    seed: int

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """The fields as a flat dict, keys prefixed with ``prefix + "/"`` when given."""
        out = {k: (int(v) if k in ("n_samples", "seed") else float(v)) for k, v in asdict(self).items()}
        return namespace(out, prefix)


def resample_counts(n_examples: int, n_samples: int, seed: int) -> np.ndarray:
    """How often each example is drawn in each resample: (n_samples, n_examples) int64, rows sum
    to ``n_examples``. Drawn with ``numpy.random.default_rng(seed)``, so the same seed and
    sizes give the same resamples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_examples, size=(n_samples, n_examples))
    offsets = (np.arange(n_samples, dtype=np.int64) * n_examples)[:, None]
    return np.bincount((idx + offsets).ravel(), minlength=n_samples * n_examples).reshape(n_samples, n_examples)


def paired_bootstrap(
    stats_a: ArrayLike,
    stats_b: ArrayLike,
    score_fn: Callable[[np.ndarray], float],
    *,
    n_samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedBootstrapResult:
    """Paired bootstrap test of two systems on the same N test examples.

    ``stats_a``, ``stats_b``: (N, K) per-example sufficient statistics (or (N,) for K = 1);
    ``score_fn``: summed statistics (K,) -> corpus score. For a mean of per-example scores
    ``x_i`` use stats ``[x_i, 1]`` and ``score_fn = lambda s: s[0] / s[1]``.
    N = 0 raises ``ValueError``.

    A resample draws N example indices with replacement (the same for both systems: paired) and
    recomputes both corpus scores. With the resampled differences
    ``d_b = score_B(sample b) - score_A(sample b)`` and the observed ``d = score_B - score_A``:
    ``p_value = (1 + #{b : |d_b - mean(d_b)| >= |d|}) / (B + 1)`` (two-sided, the resampled
    differences shifted to mean 0 as the null distribution; Koehn 2004, Berg-Kirkpatrick et al.
    2012); ``ci_low``, ``ci_high``: the percentiles of ``d_b`` bounding their central
    ``confidence`` share; ``win_rate``: the fraction of resamples where B scores strictly higher.
    """
    a = as_float_array(stats_a, "stats_a", ndim=(1, 2))
    b = as_float_array(stats_b, "stats_b", ndim=(1, 2))
    if a.shape != b.shape:
        raise ValueError(f"stats_a {a.shape} and stats_b {b.shape} differ in shape")
    if len(a) == 0:
        raise ValueError("no test examples: nothing to resample")
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1; got {n_samples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    counts = resample_counts(len(a), n_samples, seed).astype(np.float64)  # (B, N)
    sums_a, sums_b = counts @ a, counts @ b  # (B, K)
    score_a, score_b = float(score_fn(a.sum(axis=0))), float(score_fn(b.sum(axis=0)))
    deltas = np.array([score_fn(sb) - score_fn(sa) for sa, sb in zip(sums_a, sums_b)], dtype=np.float64)
    delta = score_b - score_a
    centred = np.abs(deltas - deltas.mean())
    # A tolerance so that float noise in identical systems' deltas still counts as ">=".
    extreme = int(np.sum(centred >= abs(delta) - 1e-12 * max(1.0, abs(delta))))
    tail = 50 * (1 - confidence)
    lo, hi = np.percentile(deltas, [tail, 100 - tail])
    return PairedBootstrapResult(
        score_a=score_a,
        score_b=score_b,
        delta=delta,
        ci_low=float(lo),
        ci_high=float(hi),
        p_value=(1 + extreme) / (n_samples + 1),
        win_rate=float(np.mean(deltas > 0)),
        n_samples=n_samples,
        seed=seed,
    )
