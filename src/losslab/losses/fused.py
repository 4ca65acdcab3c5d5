"""Fused loss head: every token loss of :func:`token_cross_entropy` without the N x V logits.

``fused_linear_cross_entropy(hidden, weight, labels, ...)`` equals
``token_cross_entropy(hidden @ weight.T + bias, labels, ...)`` (same keyword arguments, same
result, same gradients) but never holds the logits of more than one chunk of tokens. How it
works (chunks, vocabulary tiles, the gradient in the forward pass, dtypes): docs/fused-head.md.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from losslab.labels import IGNORE_INDEX
from losslab.losses.common import compute_dtype
from losslab.losses.reduction import check_count, check_reduction
from losslab.losses.token import TOKEN_REDUCTIONS, check_token_options, focal_factor

# Default chunk: CHUNK_ROWS trained tokens (every chunk re-reads W twice, so fewer rows cost
# time; at d=576 on a 2-core AMD EPYC, 512 rows run at the speed of the full-size matmuls),
# but a chunk's logits never take more than the weight gradient or MIN_CHUNK_BYTES, whichever
# is larger. CPU: vocabulary tiles of at most CPU_TILE_BYTES of chunk logits. Small tiles
# (a few MB, in cache) measured no faster than whole rows on that CPU, and every tile adds a
# dozen parallel regions (thread barriers), which stall on a CPU shared with other processes;
# so tiles are large and mainly bound the float32 copy of a 16-bit weight tile. CUDA: no tiling.
CHUNK_ROWS = 512
MIN_CHUNK_BYTES = 64 * 2**20
CPU_TILE_BYTES = 128 * 2**20


@dataclass(frozen=True)
class _Formula:
    label_smoothing: float
    z_loss: float
    focal_gamma: float
    dft: bool = False


def default_chunk_size(num_rows: int, vocab: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Trained tokens per chunk: ``CHUNK_ROWS``, fewer when the chunk's logits (compute dtype)
    would exceed both the weight gradient's size and ``MIN_CHUNK_BYTES``."""
    itemsize = compute_dtype(dtype).itemsize
    budget = max(MIN_CHUNK_BYTES, vocab * hidden_size * itemsize)
    rows = min(CHUNK_ROWS, budget // max(1, vocab * itemsize))
    return max(1, min(num_rows, rows))


def _tile_size(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    if device.type == "cuda":
        return vocab
    cols = -(-vocab // -(-(rows * vocab * dtype.itemsize) // CPU_TILE_BYTES))  # equal tiles
    return max(64, min(vocab, cols))


def _row_terms(
    lse: torch.Tensor, z_target: torch.Tensor, z_mean: torch.Tensor | None, vocab: int, f: _Formula
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row loss and the coefficients of its gradient with respect to the row's logits.

    With ``p = softmax(z)``, ``nll = lse - z_y`` (clamped at 0: ``z_y`` is not read from the
    logits that gave ``lse``, so rounding could make it -1e-5), ``smooth = lse - mean_v z_v``,
    ``base = (1 - eps) nll + eps smooth``, ``pt = exp(-nll)``, ``F = (1 - pt)^gamma``:
    ``loss = F base + zeta lse^2`` (the formula of :func:`token_loss_terms`) and, using
    ``d nll = p - e_y``, ``d smooth = p - 1/V``, ``d lse = p``, ``d pt = pt (e_y - p)``:

    ``dloss/dz = A p - C e_y - B`` with
    ``G = gamma (1 - pt)^(gamma - 1) pt`` (``dF = G (p - e_y)``),
    ``A = F + G base + 2 zeta lse``, ``C = F (1 - eps) + G base``, ``B = F eps / V``.
    Returns ``(loss, A, C, B)``; ``B`` is None without label smoothing. ``F`` and ``G`` are 0
    where ``1 - pt`` is (``G`` would be inf times 0 for ``gamma < 1``), see :func:`focal_factor`.
    DFT (never with ``eps`` or ``gamma``): ``loss = sg(pt) nll + zeta lse^2``, ``sg(pt)`` a
    constant, so ``A = pt + 2 zeta lse``, ``C = pt``.
    """
    eps, zeta, gamma = f.label_smoothing, f.z_loss, f.focal_gamma
    nll = (lse - z_target).clamp(min=0)
    if f.dft:
        pt = torch.exp(-nll)
        loss, coef_p, coef_y = pt * nll, pt, pt.clone()
        if zeta:
            loss = loss + zeta * lse.square()
            coef_p = coef_p + (2.0 * zeta) * lse
        return loss, coef_p, coef_y, None
    if eps:
        assert z_mean is not None, "label smoothing needs the mean logit"
        base = (1.0 - eps) * nll + eps * (lse - z_mean)
    else:
        base = nll
    if gamma:
        pt = torch.exp(-nll)
        one_minus = 1.0 - pt
        focal = focal_factor(one_minus, gamma)
        tiny = torch.finfo(lse.dtype).tiny
        g = torch.where(one_minus >= tiny, gamma * one_minus.clamp(min=tiny).pow(gamma - 1.0) * pt, 0.0)
        loss = focal * base
        coef_p = focal + g * base
        coef_y = focal * (1.0 - eps) + g * base
        coef_c = focal * (eps / vocab) if eps else None
    else:
        loss = base
        coef_p = torch.ones_like(lse)
        coef_y = torch.full_like(lse, 1.0 - eps)
        coef_c = torch.full_like(lse, eps / vocab) if eps else None
    if zeta:
        loss = loss + zeta * lse.square()
        coef_p = coef_p + (2.0 * zeta) * lse
    return loss, coef_p, coef_y, coef_c


# hidden (n, d), weight (V, d), bias (V,) or None, targets (n,)
_HeadInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]


@dataclass
class _HeadGrads:
    row_loss: torch.Tensor
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def _head_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    row_scale: torch.Tensor | None,
    formula: _Formula,
    chunk_size: int | None,
    *,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> _HeadGrads:
    """Row losses of trained rows, and the gradients of ``sum(row_scale * row_loss)``.

    ``hidden`` (n, d) trained rows only, ``targets`` (n,), ``row_scale`` (n,) compute dtype
    or None for losses only. Gradients are in the compute dtype; ``weight`` / ``bias``
    gradients are (V, d) / (V,).
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    cdtype = compute_dtype(hidden.dtype)
    device = hidden.device
    want = row_scale is not None
    # the gradients wanted (None: not computed)
    g_hidden = torch.empty(n, d, dtype=cdtype, device=device) if want and grad_hidden else None
    g_weight = torch.zeros(vocab, d, dtype=cdtype, device=device) if want and grad_weight else None
    g_bias = torch.zeros(vocab, dtype=cdtype, device=device) if want and grad_bias else None
    row_loss = torch.empty(n, dtype=cdtype, device=device)
    out = _HeadGrads(row_loss=row_loss, hidden=g_hidden, weight=g_weight, bias=g_bias)
    if n == 0:
        if g_hidden is not None:
            g_hidden.zero_()
        return out

    w_cast = weight.dtype != cdtype
    bias_c = bias.to(cdtype) if bias is not None else None
    smoothing = formula.label_smoothing != 0.0
    if smoothing:  # mean logit = h . mean_v(W_v) + mean(b); sum_v W_v for the constant term
        w_sum = weight.sum(dim=0, dtype=cdtype)
        w_mean = w_sum / vocab
        b_mean = bias_c.mean() if bias_c is not None else 0.0
        rank_one_w = torch.zeros(d, dtype=cdtype, device=device)  # sum_n B_n h_n
        rank_one_b = torch.zeros((), dtype=cdtype, device=device)

    rows = chunk_size or default_chunk_size(n, vocab, d, hidden.dtype)
    rows = max(1, min(rows, n))
    tile = _tile_size(rows, vocab, cdtype, device)
    bounds = [(v0, min(v0 + tile, vocab)) for v0 in range(0, vocab, tile)]
    storage = torch.empty(rows * vocab, dtype=cdtype, device=device)

    def weight_tile(v0: int, v1: int) -> torch.Tensor:
        w = weight[v0:v1]
        return w.to(cdtype) if w_cast else w

    for s in range(0, n, rows):
        e = min(s + rows, n)
        r = e - s
        h_c = hidden[s:e].to(cdtype)
        y_c = targets[s:e]
        tiles = [storage[r * v0 : r * v1].view(r, v1 - v0) for v0, v1 in bounds]
        maxes = torch.empty(len(bounds), r, dtype=cdtype, device=device)
        sums = torch.empty(len(bounds), r, dtype=cdtype, device=device)
        # 1. logits tile by tile; keep exp(z - m_t) in place (r, V) in all
        for t, ((v0, v1), z) in enumerate(zip(bounds, tiles)):
            w_t = weight_tile(v0, v1)
            if bias_c is None:
                torch.mm(h_c, w_t.T, out=z)
            else:
                torch.addmm(bias_c[v0:v1], h_c, w_t.T, out=z)
            torch.amax(z, dim=1, out=maxes[t])
            shift = torch.where(torch.isfinite(maxes[t]), maxes[t], 0.0)  # -inf - -inf would be NaN
            z.sub_(shift.unsqueeze(1)).exp_()
            torch.sum(z, dim=1, out=sums[t])
        top = maxes.amax(dim=0)
        lse = top + (sums * torch.exp(maxes - top)).sum(dim=0).log()  # (r,)
        # 2. per-row scalars
        w_y = weight.index_select(0, y_c).to(cdtype)  # (r, d)
        z_target = torch.linalg.vecdot(h_c, w_y)
        if bias_c is not None:
            z_target = z_target + bias_c.index_select(0, y_c)
        z_mean = h_c @ w_mean + b_mean if smoothing else None
        loss, coef_p, coef_y, coef_c = _row_terms(lse, z_target, z_mean, vocab, formula)
        out.row_loss[s:e] = loss
        if row_scale is None:
            continue
        scale = row_scale[s:e]
        coef_p, coef_y = coef_p * scale, coef_y * scale
        # 3. gradient: dz = A p - C e_y - B, p_t = E_t * exp(m_t - lse); coef_c (B) is not None with smoothing
        if g_hidden is not None:
            g_h = g_hidden[s:e]
            torch.mul(w_y, (-coef_y).unsqueeze(1), out=g_h)
            if coef_c is not None:
                g_h.sub_(torch.outer(coef_c * scale, w_sum))
        for t, ((v0, v1), z) in enumerate(zip(bounds, tiles)):
            row_factor = coef_p * torch.exp(maxes[t] - lse)  # (r,)
            w_t = weight_tile(v0, v1)
            if g_hidden is not None:
                g_h.addcmul_(z @ w_t, row_factor.unsqueeze(1))
            if g_weight is not None:
                g_weight[v0:v1].addmm_(z.T, h_c * row_factor.unsqueeze(1))
            if g_bias is not None:  # a cascade sum: closer to the reference than addmv_
                g_bias[v0:v1].add_(torch.sum(z * row_factor.unsqueeze(1), dim=0))
        if g_weight is not None:
            g_weight.index_add_(0, y_c, h_c * (-coef_y).unsqueeze(1))
        if g_bias is not None:
            g_bias.index_add_(0, y_c, -coef_y)
        if coef_c is not None:
            coef_c = coef_c * scale
            if g_weight is not None:
                rank_one_w.add_(coef_c @ h_c)
            if g_bias is not None:
                rank_one_b.add_(coef_c.sum())
    if smoothing:
        if g_weight is not None:
            g_weight.sub_(rank_one_w)
        if g_bias is not None:
            g_bias.sub_(rank_one_b)
    return out


def _without_autocast(device: torch.device) -> AbstractContextManager[object]:
    """Autocast switched off on ``device``: it would compute ``z_y`` and the gradient matmuls
    in 16 bits against a float32 ``lse`` (losses off by 0.2 for confident tokens), where the
    head computes in its own compute dtype, forward and backward."""
    if not torch.amp.is_autocast_available(device.type):  # e.g. meta tensors
        return nullcontext()
    return torch.autocast(device.type, enabled=False)


class ChunkedHead(Protocol):
    """One chunked loss head: ``run`` computes the row losses (n,) of its inputs and, given
    ``row_scale`` (n,), the gradients of ``sum(row_scale * row_loss)`` with respect to each
    input whose ``needs`` is True (None for the others), in the compute dtype."""

    def run(
        self, tensors: tuple[torch.Tensor | None, ...], row_scale: torch.Tensor | None, needs: tuple[bool, ...]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]: ...


class _ChunkedLoss(torch.autograd.Function):
    """``sum(row_scale * row_loss)`` (scalar) when ``row_scale`` is given, else ``row_loss`` (n,),
    for any :class:`ChunkedHead` (the cross-entropy head here, the distillation heads in
    ``fused_distillation.py``): ``_ChunkedLoss.apply(head, row_scale, *tensors)``.

    Scalar: the gradients of the sum are computed in forward and handed to autograd in
    backward, scaled by the upstream gradient (a second backward through a retained graph
    recomputes them). Vector: forward computes losses only, backward recomputes the chunks
    with the per-row upstream gradient as ``row_scale``. Gradients come back in each input's
    dtype; ``row_scale`` gets ``row_loss`` times the upstream gradient (token weights that
    require grad).
    """

    # ctx: torch's FunctionCtx, with this class's own attributes (head, dtypes, scalar, grads)
    @staticmethod
    def forward(
        ctx: Any, head: ChunkedHead, row_scale: torch.Tensor | None, *tensors: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.head = head
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in tensors)
        ctx.scalar = row_scale is not None
        ctx.save_for_backward(row_scale, *tensors)
        needs = tuple(ctx.needs_input_grad[2:])
        if row_scale is None:
            ctx.grads = None
            return head.run(tensors, None, needs)[0]
        grads = ctx.grads = head.run(tensors, row_scale.detach(), needs)
        return (row_scale.detach() * grads[0]).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        res: tuple[torch.Tensor, list[torch.Tensor | None]] | None
        res, ctx.grads = ctx.grads, None  # release: autograd adopts the buffers without a copy
        row_scale, *tensors = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[2:])
        if ctx.scalar:
            if res is None:  # second backward through a retained graph
                res = ctx.head.run(tuple(tensors), row_scale.detach(), needs)
            grad_scale = grad_out.to(res[0].dtype)
            unit = grad_out.device.type == "cpu" and float(grad_out) == 1.0
            grad_row_scale = res[0] * grad_scale if ctx.needs_input_grad[1] else None
        else:
            first = next(dtype for dtype in ctx.dtypes if dtype is not None)
            res = ctx.head.run(tuple(tensors), grad_out.to(compute_dtype(first)), needs)
            unit, grad_row_scale = True, None
        grads: list[torch.Tensor | None] = []
        for g, dtype in zip(res[1], ctx.dtypes):
            if g is not None:
                if not unit:
                    g.mul_(grad_scale)
                g = g.to(dtype)
            grads.append(g)
        del res
        return (None, grad_row_scale, *grads)


def chunked_loss(head: ChunkedHead, row_scale: torch.Tensor | None, *tensors: torch.Tensor | None) -> torch.Tensor:
    """``_ChunkedLoss.apply(head, row_scale, *tensors)``, typed."""
    out: torch.Tensor = _ChunkedLoss.apply(head, row_scale, *tensors)  # type: ignore[no-untyped-call]
    return out


@dataclass(frozen=True)
class _CrossEntropyHead:
    """The fused cross-entropy head on (hidden, weight, bias, targets), see :func:`_head_pass`."""

    formula: _Formula
    chunk_size: int | None

    def run(
        self, tensors: tuple[torch.Tensor | None, ...], row_scale: torch.Tensor | None, needs: tuple[bool, ...]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        hidden, weight, bias, targets = tensors
        assert hidden is not None and weight is not None and targets is not None
        with _without_autocast(hidden.device):
            out = _head_pass(
                hidden,
                weight,
                bias,
                targets,
                row_scale,
                self.formula,
                self.chunk_size,
                grad_hidden=needs[0],
                grad_weight=needs[1],
                grad_bias=needs[2],
            )
        return out.row_loss, [out.hidden, out.weight, out.bias, None]


class _FusedLinearCrossEntropy:
    """``sum(row_scale * row_loss)`` (scalar) when ``row_scale`` is given, else ``row_loss`` (n,),
    of the cross-entropy head (:class:`_ChunkedLoss` with :class:`_CrossEntropyHead`)."""

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        row_scale: torch.Tensor | None,
        formula: _Formula,
        chunk_size: int | None,
    ) -> torch.Tensor:
        return chunked_loss(_CrossEntropyHead(formula, chunk_size), row_scale, hidden, weight, bias, targets)


def _reduction_scale(
    mask: torch.Tensor, reduction: str, num_items: int | float | torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """d(reduced loss)/d(per-token loss), shape of ``mask``: every reduction of
    :func:`token_cross_entropy` is linear in the per-token losses, with these factors
    (``reduce_loss`` and ``sequence_mean`` written as weights; the tests hold them equal)."""
    check_count(num_items)

    def count(value: int | float | torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
        n = default if value is None else value
        return torch.as_tensor(n, dtype=dtype, device=mask.device).clamp(min=1)

    trained = mask.to(dtype)
    if reduction == "sum":
        return trained
    if reduction == "mean":
        return trained / count(num_items, mask.sum())
    per_sequence = mask.sum(dim=-1, keepdim=True)  # sequence: mean per sequence, then over sequences
    return trained / per_sequence.clamp(min=1).to(dtype) / count(num_items, (per_sequence > 0).sum())


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    focal_gamma: float = 0.0,
    token_weights: torch.Tensor | None = None,
    dft: bool = False,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``token_cross_entropy(hidden @ weight.T + bias, labels, ...)`` without the logits.

    Shapes: ``hidden`` (..., d), ``weight`` (V, d), ``labels`` (...) already aligned with
    ``hidden`` (shift before calling for next-token prediction), ``bias`` (V,) or None,
    ``token_weights`` (...) or None. Any leading shape works; ``reduction="sequence"`` takes
    the last leading dim as the sequence, e.g. ``hidden`` (B, T, d) with ``labels`` (B, T).

    Every keyword argument and reduction means what it means in :func:`token_cross_entropy`
    (per trained token ``l = w ((1 - p_y)^gamma [(1 - eps)(-log p_y) + eps mean_v(-log p_v)]
    + z lse^2)``, with ``dft`` ``l = w (sg(p_y) (-log p_y) + z lse^2)``) and the result and gradients are the same, up to float rounding.
    ``chunk_size``: trained tokens per chunk (default :func:`default_chunk_size`: 512, fewer
    when the chunk's logits would take more memory than the weight gradient). Ignored tokens are dropped
    before the matmul and get exactly zero gradient. Computed in float32 for 16-bit inputs
    (float64 stays float64), under ``torch.autocast`` too; gradients come back in the inputs'
    dtypes. For the scalar reductions the gradients are computed in the forward pass (a
    second backward through a retained graph recomputes them); under ``torch.no_grad`` /
    ``inference_mode``, or when no input requires grad, only the losses are computed.
    """
    check_reduction(reduction, TOKEN_REDUCTIONS)
    check_token_options(label_smoothing, z_loss, focal_gamma, dft)
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (..., d) and weight (V, d) do not match: {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not align")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must have shape (V,) = ({weight.shape[0]},)")
    if token_weights is not None and token_weights.shape != labels.shape:
        raise ValueError(f"token_weights {tuple(token_weights.shape)} must have the shape of labels")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    cdtype = compute_dtype(hidden.dtype)
    formula = _Formula(float(label_smoothing), float(z_loss), float(focal_gamma), bool(dft))

    mask = labels != ignore_index
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    keep = mask.reshape(-1).nonzero().squeeze(1)  # (n,) trained rows
    all_kept = keep.numel() == flat_hidden.shape[0]
    rows = flat_hidden if all_kept else flat_hidden.index_select(0, keep)
    targets = labels.reshape(-1).index_select(0, keep)
    if targets.numel() and (targets.min() < 0 or targets.max() >= weight.shape[0]):
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or ignore_index ({ignore_index})")
    weights = token_weights.to(cdtype) if token_weights is not None else None

    if reduction == "none":
        row_loss: torch.Tensor = _FusedLinearCrossEntropy.apply(rows, weight, bias, targets, None, formula, chunk_size)
        per_token = row_loss if all_kept else row_loss.new_zeros(flat_hidden.shape[0]).index_copy(0, keep, row_loss)
        per_token = per_token.reshape(labels.shape)
        if weights is None:
            return per_token
        return torch.where(mask, per_token * weights, torch.zeros_like(per_token))

    scale = _reduction_scale(mask, reduction, num_items, cdtype)
    if weights is not None:
        scale = scale * weights
    row_scale = scale.reshape(-1)
    if not all_kept:
        row_scale = row_scale.index_select(0, keep)
    tracked = (hidden, weight, bias, token_weights)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tracked)):
        # no graph will be recorded (evaluation): the scalar path would compute the gradients
        row_loss = _FusedLinearCrossEntropy.apply(rows, weight, bias, targets, None, formula, chunk_size)
        return (row_scale * row_loss).sum()
    loss: torch.Tensor = _FusedLinearCrossEntropy.apply(rows, weight, bias, targets, row_scale, formula, chunk_size)
    return loss


__all__ = ["default_chunk_size", "fused_linear_cross_entropy"]
