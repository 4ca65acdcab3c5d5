"""Token-level cross-entropy for causal LMs, with every option losslab supports."""

from __future__ import annotations

import torch

from losslab.losses.reduction import check_reduction, reduce_loss

TOKEN_REDUCTIONS = ("mean", "sum", "none", "sequence")


def token_loss_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """Per-row loss for rows that are all trained: ``logits`` (n, V) float32/64, ``targets`` (n,).

    ``loss = (1 - p_y)^gamma * [(1 - eps) * (-log p_y) + eps * mean_v(-log p_v)] + z * lse^2``
    where ``p = softmax(logits)``, ``lse = logsumexp(logits)``. Shared by the reference
    :func:`token_cross_entropy` and the fused head, so both compute the same formula.
    """
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll = lse - target_logit
    loss = nll
    if label_smoothing:
        smooth = lse - logits.mean(dim=-1)  # mean_v(-log p_v)
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    if focal_gamma:
        p_target = torch.exp(-nll)
        loss = (1.0 - p_target).clamp(min=0).pow(focal_gamma) * loss
    if z_loss:
        loss = loss + z_loss * lse.square()
    return loss


def check_token_options(label_smoothing: float, z_loss: float, focal_gamma: float) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0; got {z_loss}")
    if focal_gamma < 0:
        raise ValueError(f"focal_gamma must be >= 0; got {focal_gamma}")


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    focal_gamma: float = 0.0,
    token_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over tokens, the reference every other token loss is checked against.

    Shapes: ``logits`` (..., V), ``labels`` (...) already aligned with ``logits`` (shift them
    before calling for next-token prediction), ``token_weights`` (...) floats or None.

    Per trained token (``label != ignore_index``), with ``p = softmax(logits)``:
    ``l = w * ((1 - p_y)^focal_gamma * [(1 - eps) * (-log p_y) + eps * mean_v(-log p_v)]
    + z_loss * logsumexp(logits)^2)``; ``eps = label_smoothing`` matches
    ``F.cross_entropy(label_smoothing=eps)``. Ignored tokens contribute exactly 0.

    Reduction:
    - ``none``: per-token losses, shape of ``labels``, 0 at ignored tokens;
    - ``sum``: their sum;
    - ``mean``: sum / ``num_items`` if given, else sum / number of trained tokens (weights
      scale the numerator only, so a 0.5 role weight halves a token's say);
    - ``sequence``: mean over each sequence's trained tokens (last dim), then mean over the
      sequences that have any; ``num_items`` then overrides the number of sequences.
    Computed in float32 (float64 stays float64); an all-ignored batch gives 0 and zero grads.
    """
    check_reduction(reduction, TOKEN_REDUCTIONS)
    check_token_options(label_smoothing, z_loss, focal_gamma)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    per_token = token_loss_terms(
        logits.to(compute_dtype).reshape(-1, logits.shape[-1]),
        safe_labels.reshape(-1),
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        focal_gamma=focal_gamma,
    ).reshape(labels.shape)
    if token_weights is not None:
        if token_weights.shape != labels.shape:
            raise ValueError(f"token_weights {tuple(token_weights.shape)} must have the shape of labels")
        per_token = per_token * token_weights.to(compute_dtype)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "sequence":
        return sequence_mean(per_token, mask, num_items)
    return reduce_loss(per_token, mask, reduction, num_items)


def sequence_mean(
    per_token: torch.Tensor, mask: torch.Tensor, num_sequences: int | float | torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over each sequence's trained tokens (last dim), then over sequences that have any.

    ``per_token`` and ``mask`` (..., T). ``num_sequences`` overrides the outer denominator.
    """
    counts = mask.sum(dim=-1)
    per_seq = per_token.sum(dim=-1) / counts.clamp(min=1).to(per_token.dtype)
    return reduce_loss(per_seq, counts > 0, "mean", num_sequences)
