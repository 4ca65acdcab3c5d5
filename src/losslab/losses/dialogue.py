"""The extra terms of the "enhanced" dialogue loss: CE + alpha * consistency + beta * semantic.

The design documents' sample code takes absolute differences of raw logits along the wrong
axis and a mean square of unmasked features; these are sound, masked definitions:

- :func:`consistency_loss`: a divergence between the predicted next-token distributions of
  ADJACENT TRAINED positions (t and t + 1 both trained, same sequence);
- :func:`semantic_l2_loss`: an L2 penalty on the masked mean of the context features (what
  the documents describe);
- :func:`semantic_alignment_loss`: ``1 - cos`` between the pooled response and pooled context
  hidden states (the sounder variant).

All three give 0 and zero (finite) gradients when nothing qualifies. Float inputs of any
dtype are computed in float32 (float64 stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from losslab.losses.common import Count, check_choice, compute_dtype, finish, masked
from losslab.losses.pairwise import pairwise_distance

Divergence = Literal["js", "kl", "l1"]


def _js(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    # where p = q = 0, m = 0 too: both terms are dropped by _kl, but logaddexp(-inf, -inf)
    # has a NaN derivative, so it is taken of 0s there
    both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
    log_p_safe, log_q_safe = (torch.where(both_zero, 0.0, x) for x in (log_p, log_q))
    log_m = torch.logaddexp(log_p_safe, log_q_safe) - math.log(2.0)
    return 0.5 * (_kl(log_p, log_m) + _kl(log_q, log_m))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_v p_v (log p_v - log q_v)`` with ``0 log 0 = 0``: a -inf logit (``p_v = 0``)
    adds nothing, instead of ``0 * (-inf - -inf) = NaN``."""
    terms = torch.where(torch.isneginf(log_p), 0.0, log_p - log_q)
    return (log_p.exp() * terms).sum(dim=-1)


def _l1(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() - log_q.exp()).abs().sum(dim=-1)


_DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"js": _js, "kl": _kl, "l1": _l1}
DIVERGENCES = tuple(_DIVERGENCES)


def consistency_loss(
    logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    divergence: Divergence = "js",
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Divergence between the next-token distributions of adjacent trained positions.

    Shapes: ``logits`` (..., T, V), ``mask`` (..., T) True at trained positions (for a causal
    LM: shifted ``labels != ignore_index``). With ``p_t = softmax(logits[..., t, :])``, one
    item per pair (t, t + 1) with both positions trained, shape (..., T - 1):

    - ``js`` (default): Jensen-Shannon ``0.5 KL(p_t || m) + 0.5 KL(p_{t+1} || m)``,
      ``m = (p_t + p_{t+1}) / 2``; symmetric, bounded by log 2, finite for any logits;
    - ``kl``: ``KL(p_t || p_{t+1}) = sum_v p_t[v] (log p_t[v] - log p_{t+1}[v])``, with
      ``0 log 0 = 0`` (a token masked to -inf at t adds nothing; inf if only ``p_{t+1}[v]`` is 0);
    - ``l1``: ``sum_v |p_t[v] - p_{t+1}[v]|`` (twice the total variation, at most 2).

    Gradients reach both positions. ``mean`` divides by the number of pairs (or
    ``num_items``). Positions across an untrained gap (e.g. two assistant turns separated by
    a user turn) are not paired.
    """
    check_choice("divergence", divergence, DIVERGENCES)
    if logits.shape[:-1] != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} do not align")
    dtype = compute_dtype(logits)
    pairs = mask[..., :-1] & mask[..., 1:]  # (..., T - 1)
    # only the P paired positions are upcast and normalised: (P, V) each, not (..., T, V)
    left = torch.log_softmax(logits[..., :-1, :][pairs].to(dtype), dim=-1)
    right = torch.log_softmax(logits[..., 1:, :][pairs].to(dtype), dim=-1)
    values = _DIVERGENCES[divergence](left, right)  # (P,)
    per_pair = torch.zeros(pairs.shape, dtype=dtype, device=logits.device).masked_scatter(pairs, values)
    return finish(per_pair, pairs, reduction, num_items)


def masked_mean_pool(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``features`` (..., T, D) over positions where ``mask`` (..., T) is True.

    Returns ``(pooled (..., D), nonempty (...))``; pooled is 0 where the mask is empty.
    Features outside the mask are selected away first: a NaN there (e.g. the hidden state of
    a fully masked padding row) reaches neither the result nor the gradients.
    """
    if features.shape[:-1] != mask.shape:
        raise ValueError(f"features {tuple(features.shape)} and mask {tuple(mask.shape)} do not align")
    counts = mask.sum(dim=-1)  # (...)
    kept = masked(features, mask.unsqueeze(-1))  # not features * mask: NaN * 0 is NaN
    pooled = kept.sum(dim=-2) / counts.clamp(min=1).unsqueeze(-1).to(features.dtype)
    return pooled, counts > 0


def semantic_l2_loss(
    features: torch.Tensor,
    context_mask: torch.Tensor,
    *,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """L2 penalty on the pooled context features, one item per sequence.

    Shapes: ``features`` (..., T, D) hidden states, ``context_mask`` (..., T) True at context
    (not trained, not padding) positions. ``l = mean_d(c_d^2)`` with ``c`` the masked mean of
    the context features; sequences without context are skipped. ``mean`` divides by the
    number of sequences with context (or ``num_items``).
    """
    pooled, nonempty = masked_mean_pool(features.to(compute_dtype(features)), context_mask)
    return finish(pooled.square().mean(dim=-1), nonempty, reduction, num_items)


def semantic_alignment_loss(
    features: torch.Tensor,
    context_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Cosine misalignment between pooled response and pooled context features, per sequence.

    Shapes: ``features`` (..., T, D), ``context_mask`` and ``response_mask`` (..., T).
    ``l = 1 - cos(r, c)`` with ``r``, ``c`` the masked means of the response and context
    features (norms clamped at 1e-6), in [0, 2]; sequences lacking either part are skipped.
    ``mean`` divides by the number of sequences that have both (or ``num_items``).
    """
    x = features.to(compute_dtype(features))
    response, has_response = masked_mean_pool(x, response_mask)
    context, has_context = masked_mean_pool(x, context_mask)
    per_seq = pairwise_distance(response, context, "cosine")
    return finish(per_seq, has_response & has_context, reduction, num_items)
