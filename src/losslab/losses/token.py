"""Token-level cross-entropy for causal LMs, with every option losslab supports."""

from __future__ import annotations

import math

import torch

from losslab.labels import IGNORE_INDEX
from losslab.losses.common import compute_dtype, masked
from losslab.losses.reduction import check_reduction, reduce_loss

TOKEN_REDUCTIONS = ("mean", "sum", "none", "sequence")


def token_loss_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    focal_gamma: float = 0.0,
    dft: bool = False,
) -> torch.Tensor:
    """Per-row loss for rows that are all trained: ``logits`` (n, V) float32/64, ``targets`` (n,).

    ``loss = (1 - p_y)^gamma * [(1 - eps) * (-log p_y) + eps * mean_v(-log p_v)] + z * lse^2``
    where ``p = softmax(logits)``, ``lse = logsumexp(logits)``; with ``dft``
    ``loss = sg(p_y) * (-log p_y) + z * lse^2`` (``sg``: no gradient; never with eps or gamma).
    Shared by the reference :func:`token_cross_entropy` and the fused head, so both compute
    the same formula.
    """
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll = lse - target_logit
    loss = nll
    if label_smoothing:
        smooth = lse - logits.mean(dim=-1)  # mean_v(-log p_v)
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    if focal_gamma:
        loss = focal_factor(1.0 - torch.exp(-nll), focal_gamma) * loss
    if dft:
        loss = torch.exp(-nll).detach() * loss
    if z_loss:
        loss = loss + z_loss * lse.square()
    return loss


def focal_factor(one_minus_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """The focal factor ``(1 - p)^gamma``, given ``one_minus_p = 1 - p`` (any shape).

    For ``gamma < 1`` its derivative ``gamma (1 - p)^(gamma - 1)`` is inf at ``p = 1`` (and
    overflows just above it), where the loss it multiplies is 0: autograd's ``inf * 0`` is
    NaN, while the true gradient is 0. So below the smallest normal number the factor is
    exactly 0 with zero gradient (the power is taken of a safe 1 there).
    """
    positive = one_minus_p >= torch.finfo(one_minus_p.dtype).tiny
    safe = torch.where(positive, one_minus_p, torch.ones_like(one_minus_p))
    return torch.where(positive, safe.pow(gamma), torch.zeros_like(one_minus_p))


def check_token_options(label_smoothing: float, z_loss: float, focal_gamma: float, dft: bool = False) -> None:
    """``ValueError`` unless ``label_smoothing`` is in [0, 1] and the others are finite and
    >= 0 (comparisons alone would let NaN through), and unless ``dft`` comes without label
    smoothing and focal_gamma (each reweights the token's loss by its probability otherwise;
    DFT composes with z_loss, token weights and every reduction)."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be >= 0 and finite; got {z_loss}")
    if not (math.isfinite(focal_gamma) and focal_gamma >= 0):
        raise ValueError(f"focal_gamma must be >= 0 and finite; got {focal_gamma}")
    if not isinstance(dft, bool):
        raise TypeError(f"dft must be true or false; got {dft!r}")
    if dft and (label_smoothing or focal_gamma):
        given = [
            f"{name}={value}"
            for name, value in (("label_smoothing", label_smoothing), ("focal_gamma", focal_gamma))
            if value
        ]
        raise ValueError(
            f"dft does not compose with {' and '.join(given)}: DFT scales the plain cross-entropy by p_y; "
            "use it alone or with z_loss and token weights"
        )


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    focal_gamma: float = 0.0,
    token_weights: torch.Tensor | None = None,
    dft: bool = False,
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
    ``dft=True`` (Dynamic Fine-Tuning, Wu et al. 2025, arXiv:2508.05629, as TRL's
    ``loss_type="dft"``): ``l = w * (sg(p_y) * (-log p_y) + z_loss * logsumexp(logits)^2)``,
    ``sg(p_y)`` the token's probability without gradient; refused with label smoothing or
    focal_gamma (:func:`check_token_options`).

    Reduction:
    - ``none``: per-token losses, shape of ``labels``, 0 at ignored tokens;
    - ``sum``: their sum;
    - ``mean``: sum / ``num_items`` if given, else sum / number of trained tokens (weights
      scale the numerator only, so a 0.5 role weight halves a token's say);
    - ``sequence``: mean over each sequence's trained tokens (last dim), then mean over the
      sequences that have any; ``num_items`` then overrides the number of sequences.
    Computed in float32 (float64 stays float64); an all-ignored batch gives 0 and zero grads.
    Only trained tokens are computed (their rows selected first), and ignored tokens' weights
    are replaced by 0, so a NaN or inf there reaches neither the loss nor the gradients.
    """
    check_reduction(reduction, TOKEN_REDUCTIONS)
    check_token_options(label_smoothing, z_loss, focal_gamma, dft)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    cdtype = compute_dtype(logits)
    mask = labels != ignore_index
    trained = mask.reshape(-1)
    # only the trained rows are computed: faster when much is ignored, and a NaN in an ignored
    # row (padding) cannot reach the gradients, as it would through a where after computing
    # (on an accelerator, the check and the selection each wait for the device: a sync, taken
    # over a float32 copy of all the ignored rows' logits)
    rows, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if not bool(trained.all()):  # (no copy when every token is trained)
        rows, targets = rows[trained], targets[trained]
    per_row = token_loss_terms(
        rows.to(cdtype),
        targets,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        focal_gamma=focal_gamma,
        dft=dft,
    )
    # exactly 0 at ignored tokens: nothing was computed there
    per_token = per_row.new_zeros(trained.shape).masked_scatter(trained, per_row).reshape(labels.shape)
    if token_weights is not None:
        if token_weights.shape != labels.shape:
            raise ValueError(f"token_weights {tuple(token_weights.shape)} must have the shape of labels")
        per_token = per_token * masked(token_weights.to(cdtype), mask)
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
