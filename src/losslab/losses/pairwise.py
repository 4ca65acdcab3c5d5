"""Pairwise and ranking losses: reward models, margin ranking, triplets, InfoNCE.

Each function returns per-pair (per-anchor) losses reduced by ``reduction`` (``mean`` |
``sum`` | ``none``) exactly as the sequence-level losses: ``mask`` (N,) False = not trained,
``weights`` (N,) scale the numerator, ``mean`` divides by ``num_items`` or the number of
trained items, an all-masked batch gives 0 and zero gradients. Inputs are zeroed at masked
items before computing, so a NaN or inf there reaches neither the loss nor the gradients.
Float inputs of any dtype are computed in float32 (float64 stays float64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from losslab.losses.common import (
    Count,
    NonNegative,
    Positive,
    check_choice,
    check_range,
    check_same_shape,
    compute_dtype,
    finish,
    masked,
)
from losslab.losses.gather import gather_across_devices as gather
from losslab.losses.gather import process_group_size

Distance = Literal["euclidean", "squared_euclidean", "cosine", "manhattan"]
_EPS = 1e-12


def _per_pair(name: str, values: torch.Tensor | float, pairs: torch.Tensor) -> torch.Tensor:
    """``values`` (one number, or one per pair) laid out as ``pairs`` ((N,) or (N, 1)): a
    trailing dim of 1 on either side is added or dropped, so (N,) against (N, 1) never
    broadcasts to (N, N). Any other mismatch is a ``ValueError``."""
    v = torch.as_tensor(values, dtype=pairs.dtype, device=pairs.device)
    if v.ndim == 0 or v.shape == pairs.shape:
        return v
    if _without_trailing_one(v.shape) != _without_trailing_one(pairs.shape):
        raise ValueError(
            f"{name} {tuple(v.shape)} does not match the pairs {tuple(pairs.shape)}: give one number or one per pair"
        )
    return v.reshape(pairs.shape)


def _without_trailing_one(shape: torch.Size) -> torch.Size:
    return shape[:-1] if len(shape) > 1 and shape[-1] == 1 else shape


def bradley_terry_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: NonNegative = 0.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Reward-model (Bradley-Terry) pairwise loss.

    Shapes: ``rewards_chosen``, ``rewards_rejected`` (N,) scalar rewards (a trailing dim of
    1 is fine: the loss then has their shape); ``margin`` (N,) or (N, 1) per-pair margins,
    or one number.
    ``l = -log sigmoid(r_c - r_r - m) + c * (r_c + r_r)^2`` with ``c`` =
    ``center_rewards_coefficient`` (pulls rewards towards mean zero, as in TRL's
    ``RewardTrainer``; its ``mean`` is this ``mean``).
    """
    check_range("center_rewards_coefficient", center_rewards_coefficient, 0.0)
    check_same_shape(rewards_chosen=rewards_chosen, rewards_rejected=rewards_rejected)
    dtype = compute_dtype(rewards_chosen)
    chosen, rejected = masked(rewards_chosen, mask).to(dtype), masked(rewards_rejected, mask).to(dtype)
    diff = chosen - rejected
    if margin is not None:
        m = _per_pair("margin", margin, diff)
        diff = diff - (masked(m, mask) if m.ndim else m)
    per_item = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        per_item = per_item + center_rewards_coefficient * (chosen + rejected).square()
    return finish(per_item, mask, reduction, num_items, weights)


def margin_ranking_loss(
    scores_1: torch.Tensor,
    scores_2: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    margin: NonNegative = 0.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Margin ranking loss: ``l = max(0, margin - y * (s1 - s2))`` (``F.margin_ranking_loss``).

    Shapes: ``scores_1``, ``scores_2``, ``target`` (N,) (a trailing dim of 1 on any of them
    is fine); ``target`` is +1 where ``s1`` should rank higher and -1 where ``s2`` should;
    None means +1 everywhere (chosen vs rejected).
    """
    check_range("margin", margin, 0.0)
    check_same_shape(scores_1=scores_1, scores_2=scores_2)
    dtype = compute_dtype(scores_1)
    diff = masked(scores_1, mask).to(dtype) - masked(scores_2, mask).to(dtype)
    if target is not None:
        y = _per_pair("target", target, diff)
        diff = diff * (masked(y, mask) if y.ndim else y)
    return finish((margin - diff).clamp(min=0), mask, reduction, num_items, weights)


def _norm(x: torch.Tensor) -> torch.Tensor:
    # sqrt clamped away from 0, so the gradient stays finite when two points coincide
    return x.square().sum(dim=-1).clamp(min=_EPS).sqrt()


_DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "euclidean": lambda a, b: _norm(a - b),
    "squared_euclidean": lambda a, b: (a - b).square().sum(dim=-1),
    "cosine": lambda a, b: 1.0 - (a * b).sum(dim=-1) / (_norm(a) * _norm(b)),
    "manhattan": lambda a, b: (a - b).abs().sum(dim=-1),
}
DISTANCES = tuple(_DISTANCES)


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, distance: Distance = "euclidean") -> torch.Tensor:
    """Row-wise distance between ``a`` and ``b`` (..., D) -> (...).

    ``euclidean`` ``||a - b||``; ``squared_euclidean`` ``||a - b||^2``; ``cosine``
    ``1 - cos(a, b)``; ``manhattan`` ``||a - b||_1``. Norms are clamped at 1e-6 (their
    square at 1e-12) so gradients stay finite for coincident or zero vectors.
    """
    check_choice("distance", distance, DISTANCES)
    return _DISTANCES[distance](a, b)


def triplet_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    margin: NonNegative = 1.0,
    distance: Distance = "euclidean",
    swap: bool = False,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Triplet margin loss: ``l = max(0, d(a, p) - d(a, n) + margin)``.

    Shapes: ``anchor``, ``positive``, ``negative`` (N, D) embeddings. ``distance`` is one of
    :data:`DISTANCES` (see :func:`pairwise_distance`). ``swap`` uses
    ``min(d(a, n), d(p, n))`` as the negative distance (Balntas et al. 2016, as
    ``F.triplet_margin_loss(swap=True)``).
    """
    check_range("margin", margin, 0.0)
    check_choice("distance", distance, DISTANCES)
    check_same_shape(anchor=anchor, positive=positive, negative=negative)
    dtype = compute_dtype(anchor)
    a, p, n = (masked(x, mask).to(dtype) for x in (anchor, positive, negative))
    d_pos = pairwise_distance(a, p, distance)
    d_neg = pairwise_distance(a, n, distance)
    if swap:
        d_neg = torch.minimum(d_neg, pairwise_distance(p, n, distance))
    return finish((d_pos - d_neg + margin).clamp(min=0), mask, reduction, num_items, weights)


def _row_cross_entropy(scores: torch.Tensor, valid_columns: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-s[i, targets[i]] + logsumexp_j s[i, j]`` over valid columns j; scores (N, C), targets (N,)."""
    floor = torch.finfo(scores.dtype).min  # finite: keeps logsumexp and its gradient finite
    scores = scores.masked_fill(~valid_columns, floor)
    return torch.logsumexp(scores, dim=-1) - scores.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _check_ids(name: str, ids: torch.Tensor | None, rows: int) -> None:
    if ids is not None and (ids.shape != (rows,) or ids.dtype.is_floating_point or ids.dtype == torch.bool):
        raise ValueError(f"{name} must be integer ids, one per row ({rows},); got {ids.dtype} {tuple(ids.shape)}")


def info_nce_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    negatives: torch.Tensor | None = None,
    temperature: Positive = 0.07,
    normalize: bool = True,
    symmetric: bool = False,
    gather_across_devices: bool = True,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    key_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """InfoNCE / contrastive loss with in-batch negatives (van den Oord et al. 2018).

    Shapes: ``queries``, ``keys`` (N, D), row i of each a positive pair; ``negatives``
    (M, D) extra negatives shared by every query; ``mask`` (N,). With
    ``s[i, j] = <q_i, k_j> / temperature`` (unit vectors when ``normalize``), the other
    trained rows' keys and all ``negatives`` serve as negatives:
    ``l_i = -s[i, i] + log(sum_{j trained} exp s[i, j] + sum_m exp <q_i, n_m> / temperature)``.
    ``symmetric`` averages this with the key-to-query direction (CLIP):
    ``0.5 * (l_i + [-s[i, i] + log sum_{j trained} exp s[j, i]])``.
    A masked row is neither an anchor nor anyone's negative. The loss of a batch depends on
    the whole batch (its negatives), so micro-batches do not add up to a larger batch.

    ``key_ids`` (N,) and ``negative_ids`` (M,): integer ids of the texts behind the keys and
    the negatives (equal ids = the same text, e.g. a hash of the tokens). A key or negative
    with query i's key id, other than its own key, is the same text as its positive: it is
    left out of query i's negatives (and, when ``symmetric``, a query whose key has key i's
    id is left out of key i's), so a repeated reply is never a false negative.

    ``gather_across_devices`` (under ``torch.distributed`` with several processes; nothing
    changes otherwise): the rows j and the negatives m run over the keys, masks and negatives of
    EVERY process (and, when ``symmetric``, the queries j of every process compete for each key),
    gathered (with their ids) by :func:`~losslab.losses.gather.gather_across_devices`, which sends each row's
    gradient back to its process. Each process still scores only its own queries, so with
    ``num_items`` the number of trained rows of all processes, the values summed over the
    processes and their gradients (DDP averaging a loss scaled by the process count) are those
    of one process holding all the rows. A collective: every process must call it together.
    """
    check_range("temperature", temperature, 0.0)
    if temperature == 0:
        raise ValueError("temperature must be > 0")
    check_same_shape(queries=queries, keys=keys)
    dtype = compute_dtype(queries)
    q, k = masked(queries, mask).to(dtype), masked(keys, mask).to(dtype)
    n = negatives.to(dtype) if negatives is not None else q.new_zeros((0, q.shape[-1]))
    if normalize:
        q, k, n = (x / _norm(x).unsqueeze(-1) for x in (q, k, n))
    rows = q.shape[0]
    valid = torch.ones(rows, dtype=torch.bool, device=q.device) if mask is None else mask.to(torch.bool)
    _check_ids("key_ids", key_ids, rows)
    _check_ids("negative_ids", negative_ids, n.shape[0])
    key_ids = key_ids.to(q.device) if key_ids is not None else None
    negative_ids = negative_ids.to(q.device) if negative_ids is not None else None
    if negative_ids is not None and key_ids is None:
        raise ValueError("negative_ids needs key_ids (a negative is left out where it has the query's key id)")
    every_q, every_k, every_valid, every_n, start = q, k, valid, n, 0
    every_ids, every_neg_ids = key_ids, negative_ids
    if gather_across_devices and process_group_size() > 1:
        every_k, start = gather(k)
        every_valid = gather(valid.to(dtype))[0] > 0.5
        if negatives is not None:  # the same on every process
            every_n = gather(n)[0]
            every_neg_ids = gather(negative_ids)[0] if negative_ids is not None else None
        if symmetric:
            every_q = gather(q)[0]
        every_ids = gather(key_ids)[0] if key_ids is not None else None
    targets = start + torch.arange(rows, device=q.device)  # each query's own key among every key
    scores = q @ torch.cat([every_k, every_n]).T / temperature  # (N, N_all + M_all)
    key_columns = every_valid.expand(rows, -1)  # (N, N_all)
    if key_ids is not None:
        assert every_ids is not None
        # the same text as query i's positive (its own key aside) is not one of its negatives
        same = key_ids.unsqueeze(1) == every_ids.unsqueeze(0)
        same[torch.arange(rows, device=q.device), targets] = False
        key_columns = key_columns & ~same
    negative_columns = torch.ones(rows, every_n.shape[0], dtype=torch.bool, device=q.device)
    if every_neg_ids is not None:
        assert key_ids is not None
        negative_columns = key_ids.unsqueeze(1) != every_neg_ids.unsqueeze(0)
    per_item = _row_cross_entropy(scores, torch.cat([key_columns, negative_columns], dim=1), targets)
    if symmetric:
        # each key against every query: (N, N_all); a query whose key is key i's text is not its negative
        key_scores = scores[:, :rows].T if every_q is q else k @ every_q.T / temperature
        backward = _row_cross_entropy(key_scores, key_columns, targets)
        per_item = 0.5 * (per_item + backward)
    return finish(per_item, valid, reduction, num_items, weights)
