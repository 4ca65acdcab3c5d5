"""Sequence-level losses for classification and regression heads.

Every function returns per-item losses reduced by ``reduction`` (``mean`` | ``sum`` |
``none``): ``none`` gives one value per item (0 where masked or ignored), ``sum`` their sum,
``mean`` the sum divided by ``num_items`` when given (the global count, for exact gradient
accumulation) else by the number of trained items. ``weights`` (per-item, or per-example
``(N,)`` broadcast over labels) scale the numerator only. An all-masked batch gives 0 and
zero gradients. Inputs are zeroed at masked or ignored items before computing, so a NaN or
inf there reaches neither the loss nor the gradients. Inputs of any float dtype are computed
in float32 (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losslab.labels import IGNORE_INDEX
from losslab.losses.common import (
    ClassValues,
    Count,
    NonNegative,
    Positive,
    Probability,
    check_range,
    check_same_shape,
    class_vector,
    compute_dtype,
    finish,
    masked,
    split_targets,
)
from losslab.losses.token import focal_factor, token_loss_terms


def check_focal_options(gamma: float, alpha: float | None = None) -> None:
    """``gamma >= 0``; a single ``alpha`` (the binary focal loss's) in [0, 1]."""
    check_range("gamma", gamma, 0.0)
    if alpha is not None:
        check_range("alpha", alpha, 0.0, 1.0)


def classification_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    class_weights: ClassValues = None,
    label_smoothing: Probability = 0.0,
    ignore_index: int = IGNORE_INDEX,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Cross-entropy of a classification head, with class weights and label smoothing.

    Shapes: ``logits`` (..., C), ``targets`` (...) class indices (``ignore_index`` = not trained).
    Per item, with ``log p = log_softmax(logits)``, ``w`` = ``class_weights`` (ones if None),
    ``eps`` = ``label_smoothing``:
    ``l = (1 - eps) * w[y] * (-log p[y]) + (eps / C) * sum_c w[c] * (-log p[c])``,
    the per-item value of ``F.cross_entropy(weight=w, label_smoothing=eps, reduction="none")``.

    ``mean`` divides by the number of trained items (or ``num_items``), NOT by
    ``sum_i w[y_i]`` as ``F.cross_entropy``'s weighted mean does: class weights scale the
    numerator only, like token weights, so micro-batches add up exactly with a plain count.
    """
    check_range("label_smoothing", label_smoothing, 0.0, 1.0)
    mask, safe = split_targets(targets, ignore_index)
    log_p = torch.log_softmax(masked(logits, mask).to(compute_dtype(logits)), dim=-1)
    nll = -log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    w = class_vector(class_weights, log_p, "class_weights")
    if w is None:
        smooth = -log_p.mean(dim=-1)
    else:
        nll = nll * w[safe]
        smooth = -(log_p * w).mean(dim=-1)
    per_item = (1.0 - label_smoothing) * nll + label_smoothing * smooth if label_smoothing else nll
    return finish(per_item, mask, reduction, num_items, weights)


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    gamma: NonNegative = 2.0,
    alpha: NonNegative | ClassValues = None,
    label_smoothing: Probability = 0.0,
    ignore_index: int = IGNORE_INDEX,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Multi-class focal loss (Lin et al. 2017), with optional label smoothing.

    Shapes: ``logits`` (..., C), ``targets`` (...) class indices. With ``p = softmax(logits)``:
    ``l = a[y] * (1 - p[y])^gamma * [(1 - eps) * (-log p[y]) + eps * mean_c(-log p[c])]``.
    ``alpha``: None (a = 1), one number (the same for every class) or one per class.
    The modulating factor uses the probability of the TRUE class and multiplies the
    smoothed cross-entropy (the formula of ``token_cross_entropy(focal_gamma=...)``), so
    ``gamma = 0`` gives the smoothed cross-entropy exactly.
    """
    check_focal_options(gamma)
    check_range("label_smoothing", label_smoothing, 0.0, 1.0)
    mask, safe = split_targets(targets, ignore_index)
    x = masked(logits, mask).to(compute_dtype(logits))
    per_item = token_loss_terms(
        x.reshape(-1, x.shape[-1]), safe.reshape(-1), label_smoothing=label_smoothing, focal_gamma=gamma
    ).reshape(safe.shape)
    a = class_vector(alpha, x, "alpha")
    if a is not None:
        per_item = per_item * (a[safe] if a.ndim else a)
    return finish(per_item, mask, reduction, num_items, weights)


def binary_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    pos_weight: NonNegative | ClassValues = None,
    label_smoothing: Probability = 0.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Binary cross-entropy on logits, one independent sigmoid per label (multi-label).

    Shapes: ``logits`` and ``targets`` (N, K) (or any equal shapes), targets in [0, 1];
    ``pos_weight`` (K,) or a number; ``mask`` broadcastable to (N, K), False = not trained.
    Per element, with ``y' = (1 - eps) * y + eps / 2`` and ``s = sigmoid(x)``:
    ``l = -[pos_weight * y' * log s + (1 - y') * log(1 - s)]``, the value of
    ``F.binary_cross_entropy_with_logits(x, y', pos_weight=..., reduction="none")``.
    ``mean`` averages over the trained elements (labels, not examples), like that function.
    """
    check_range("label_smoothing", label_smoothing, 0.0, 1.0)
    check_same_shape(logits=logits, targets=targets)
    x = masked(logits, mask).to(compute_dtype(logits))
    y = masked(targets.to(x.dtype), mask)
    if label_smoothing:
        y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
    pw = class_vector(pos_weight, x, "pos_weight")
    log_s, log_not_s = F.logsigmoid(x), F.logsigmoid(-x)
    positive = y * log_s if pw is None else pw * y * log_s
    per_item = -(positive + (1.0 - y) * log_not_s)
    return finish(per_item, mask, reduction, num_items, weights)


def binary_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    gamma: NonNegative = 2.0,
    alpha: Probability | None = 0.25,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Binary (sigmoid) focal loss per element (Lin et al. 2017; torchvision's convention).

    Shapes: ``logits`` and ``targets`` (N, K) or any equal shapes, targets in [0, 1].
    With ``p = sigmoid(x)``, ``p_t = p * y + (1 - p) * (1 - y)``,
    ``a_t = alpha * y + (1 - alpha) * (1 - y)`` (1 when ``alpha`` is None):
    ``l = a_t * (1 - p_t)^gamma * BCE(x, y)``. ``gamma = 0, alpha = None`` is plain BCE.
    """
    check_focal_options(gamma, alpha)
    check_same_shape(logits=logits, targets=targets)
    x = masked(logits, mask).to(compute_dtype(logits))
    y = masked(targets.to(x.dtype), mask)
    bce = -(y * F.logsigmoid(x) + (1.0 - y) * F.logsigmoid(-x))
    # 1 - p_t = p (1 - y) + (1 - p) y, without the cancellation of 1 - p_t near p_t = 1
    one_minus = torch.sigmoid(x) * (1.0 - y) + torch.sigmoid(-x) * y
    per_item = focal_factor(one_minus, gamma) * bce if gamma else bce
    if alpha is not None:
        per_item = (alpha * y + (1.0 - alpha) * (1.0 - y)) * per_item
    return finish(per_item, mask, reduction, num_items, weights)


def multiclass_hinge_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    margin: NonNegative = 1.0,
    squared: bool = False,
    class_weights: ClassValues = None,
    ignore_index: int = IGNORE_INDEX,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Multi-class hinge loss (Weston-Watkins form, as ``F.multi_margin_loss``).

    Shapes: ``logits`` (..., C) scores, ``targets`` (...) class indices.
    ``l = w[y] / C * sum_{c != y} max(0, margin - s[y] + s[c])^q`` with ``q = 2`` when
    ``squared`` else 1, ``w`` = ``class_weights`` (ones if None). Zero once the true class
    beats every other class by ``margin``.
    """
    check_range("margin", margin, 0.0)
    mask, safe = split_targets(targets, ignore_index)
    s = masked(logits, mask).to(compute_dtype(logits))
    target_score = s.gather(-1, safe.unsqueeze(-1))
    hinge = (margin - target_score + s).clamp(min=0)
    if squared:
        hinge = hinge.square()
    # the true class is not a competitor: drop its own term (which is max(0, margin)^q)
    not_target = torch.ones_like(hinge, dtype=torch.bool).scatter(-1, safe.unsqueeze(-1), False)
    per_item = torch.where(not_target, hinge, torch.zeros_like(hinge)).sum(dim=-1) / s.shape[-1]
    w = class_vector(class_weights, s, "class_weights")
    if w is not None:
        per_item = per_item * w[safe]
    return finish(per_item, mask, reduction, num_items, weights)


def mse_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Mean squared error for regression targets: ``l = (prediction - target)^2`` per element.

    Shapes: ``predictions`` and ``targets`` equal, e.g. (N,) or (N, K); ``mask`` broadcastable.
    """
    check_same_shape(predictions=predictions, targets=targets)
    x = masked(predictions, mask).to(compute_dtype(predictions))
    return finish((x - masked(targets.to(x.dtype), mask)).square(), mask, reduction, num_items, weights)


def huber_loss(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    delta: Positive = 1.0,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Huber loss for regression targets, per element, with ``d = prediction - target``:
    ``l = 0.5 * d^2`` if ``|d| <= delta`` else ``delta * (|d| - 0.5 * delta)``
    (``F.huber_loss``; quadratic near 0, linear in the tails). Shapes as :func:`mse_loss`.
    """
    check_range("delta", delta, 0.0)
    if delta == 0:
        raise ValueError("delta must be > 0")
    check_same_shape(predictions=predictions, targets=targets)
    x = masked(predictions, mask).to(compute_dtype(predictions))
    d = (x - masked(targets.to(x.dtype), mask)).abs()
    per_item = torch.where(d <= delta, 0.5 * d.square(), delta * (d - 0.5 * delta))
    return finish(per_item, mask, reduction, num_items, weights)
