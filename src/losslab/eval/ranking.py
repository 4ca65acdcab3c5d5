"""Ranking metrics: reward models (pairwise accuracy, margin) and retrieval (recall@k, MRR)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from losslab.eval._arrays import ArrayLike, as_float_array, as_numpy, check_same_length


def _pairs(chosen: ArrayLike, rejected: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    c = as_float_array(chosen, "chosen_rewards", ndim=1)
    r = as_float_array(rejected, "rejected_rewards", ndim=1)
    check_same_length(c, r, "chosen_rewards", "rejected_rewards")
    return c, r


def pairwise_accuracy(chosen_rewards: ArrayLike, rejected_rewards: ArrayLike) -> float:
    """Fraction of N preference pairs ranked right: ``mean(1[r_c > r_r] + 0.5 * 1[r_c == r_r])``.

    ``chosen_rewards``, ``rejected_rewards``: (N,) scalar rewards of the same pairs. A tie
    counts half (a reward model that scores everything equal gets 0.5, the chance level, not
    0 or 1). N = 0 or NaN rewards raise ``ValueError``.
    """
    c, r = _pairs(chosen_rewards, rejected_rewards)
    return float(np.mean((c > r) + 0.5 * (c == r)))


def reward_margin(chosen_rewards: ArrayLike, rejected_rewards: ArrayLike) -> float:
    """Mean reward margin ``mean(r_c - r_r)`` over N pairs (shapes (N,)); N = 0 raises."""
    c, r = _pairs(chosen_rewards, rejected_rewards)
    return float(np.mean(c - r))


def reward_metrics(chosen_rewards: ArrayLike, rejected_rewards: ArrayLike) -> dict[str, float]:
    """``pairwise_accuracy``, ``reward_margin``, ``reward_chosen`` and ``reward_rejected`` (the
    mean rewards) of N preference pairs, shapes (N,)."""
    c, r = _pairs(chosen_rewards, rejected_rewards)
    return {
        "pairwise_accuracy": pairwise_accuracy(c, r),
        "reward_margin": reward_margin(c, r),
        "reward_chosen": float(c.mean()),
        "reward_rejected": float(r.mean()),
    }


def target_ranks(scores: ArrayLike, targets: ArrayLike | None = None) -> np.ndarray:
    """1-based rank of each query's correct candidate, ties counted pessimistically.

    ``scores``: (Q, C) similarity of query q to candidate c (higher = better); ``targets``:
    (Q,) index of the correct candidate per query, default ``arange(Q)`` (query i matches
    candidate i, as with in-batch pairs; needs Q <= C). ``rank_q = 1 + #{c != t_q :
    scores[q, c] >= scores[q, t_q]}``: a candidate tied with the correct one ranks ahead of
    it, so a model that scores everything equal gets the worst rank C, not rank 1.
    Returns (Q,) int64.
    """
    s = as_float_array(scores, "scores", ndim=2)
    q, c = s.shape
    if q == 0 or c == 0:
        raise ValueError(f"scores has shape {s.shape}: nothing to rank")
    if targets is None:
        if q > c:
            raise ValueError(f"targets default to arange(Q), which needs Q <= C; got scores {s.shape}")
        t = np.arange(q)
    else:
        t = as_numpy(targets, "targets", ndim=1)
        if len(t) != q:
            raise ValueError(f"{len(t)} targets for {q} queries")
        if t.dtype.kind not in "iu" or (t < 0).any() or (t >= c).any():
            raise ValueError(f"targets must be integer indices in [0, {c})")
        t = t.astype(np.int64)
    target_scores = s[np.arange(q), t][:, None]  # (Q, 1)
    return (s >= target_scores).sum(axis=1).astype(np.int64)  # counts the target itself: 1 + others


def retrieval_metrics(
    scores: ArrayLike, targets: ArrayLike | None = None, *, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """``recall@k`` for each k of ``ks`` and ``mrr`` from a (Q, C) score matrix.

    With the pessimistic ranks of :func:`target_ranks`: ``recall@k = mean_q 1[rank_q <= k]``
    (the fraction of queries whose correct candidate is in the top k; 1.0 for every k >= C),
    ``mrr = mean_q 1 / rank_q``. Empty scores raise ``ValueError``.
    """
    ranks = target_ranks(scores, targets)
    out: dict[str, float] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        out[f"recall@{k}"] = float(np.mean(ranks <= k))
    out["mrr"] = float(np.mean(1.0 / ranks))
    return out
