"""Per-sequence sums of completion-token log-probs, from logits or through the fused head.

Preference losses (DPO and its family, KTO) take one number per completion:
``sum_t log p(y_t | x, y_<t)`` over its tokens, and often its token count. Both functions here
score M positions, each with a target token and a segment (the completion it belongs to), and
return per-segment sums and counts:

- :func:`sequence_logps` from logits ``(M, V)`` already computed;
- :func:`fused_sequence_logps` from the hidden states ``(M, D)`` and the LM head ``(V, D)``,
  never holding more than one chunk of logits (the chunked head of :mod:`losslab.losses.fused`).

Sums accumulate in float32 whatever the input dtype (float64 stays float64), under
``torch.autocast`` too: a 4,000-token completion's sum (about -40,000 nats for a random model)
overflows float16 and loses every digit after the fifth in bfloat16.
"""

from __future__ import annotations

import torch

from losslab.losses.common import compute_dtype
from losslab.losses.fused import _Formula, _FusedLinearCrossEntropy, _without_autocast

_LOG_PROB = _Formula(label_smoothing=0.0, z_loss=0.0, focal_gamma=0.0)  # the fused head's plain NLL


def _check_segments(
    rows: int, targets: torch.Tensor, segments: torch.Tensor, num_segments: int, vocab: int
) -> torch.Tensor:
    """The indices (n,) of the counted positions (segment >= 0), after checking shapes and ranges."""
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"num_segments must be an int >= 0; got {num_segments!r}")
    if targets.shape != (rows,) or segments.shape != (rows,):
        raise ValueError(
            f"targets {tuple(targets.shape)} and segments {tuple(segments.shape)} must both have shape ({rows},)"
        )
    if targets.dtype != torch.long or segments.dtype != torch.long:
        raise ValueError(f"targets and segments must be int64; got {targets.dtype} and {segments.dtype}")
    if segments.numel() and (segments.min() < -1 or segments.max() >= num_segments):
        raise ValueError(f"segments must be in [-1, {num_segments}) (-1: not counted)")
    keep = (segments >= 0).nonzero().squeeze(1)  # (n,)
    kept = targets.index_select(0, keep)
    if kept.numel() and (kept.min() < 0 or kept.max() >= vocab):
        raise ValueError(f"targets of counted positions must be in [0, {vocab})")
    return keep


def _per_segment(logps: torch.Tensor, segments: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, counts)`` (S,) of per-position ``logps`` (n,) by ``segments`` (n,) in [0, S)."""
    sums = logps.new_zeros(num_segments).index_add(0, segments, logps)
    counts = torch.bincount(segments, minlength=num_segments)
    return sums, counts


def sequence_logps(
    logits: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment sums and counts of ``log softmax(logits)[target]``.

    Shapes: ``logits`` (M, V) (the logits of the M scored positions, already aligned with their
    targets: for next-token prediction the position BEFORE each target token), ``targets`` (M,)
    int64, ``segments`` (M,) int64 in ``[-1, num_segments)``: which completion each position
    belongs to, -1 for a position not counted (its target is not read).

    Returns ``(sums, counts)``, both (S,) with S = ``num_segments``:
    ``sums[s] = sum_{m: segments[m] = s} log p_m(targets[m])`` with
    ``log p(y) = z_y - logsumexp(z)``, in float32 for float16/bfloat16/float32 logits (float64
    for float64), computed with autocast off; ``counts[s]`` the number of such positions (int64).
    An empty segment gives sum 0 and count 0. Differentiable with respect to ``logits``
    (``d sums[s] / d z_m = e_y - softmax(z_m)`` for the positions of segment s).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (M, V); got {tuple(logits.shape)}")
    keep = _check_segments(logits.shape[0], targets, segments, num_segments, logits.shape[1])
    all_kept = keep.numel() == logits.shape[0]
    with _without_autocast(logits.device):
        z = (logits if all_kept else logits.index_select(0, keep)).to(compute_dtype(logits.dtype))  # (n, V)
        y = targets if all_kept else targets.index_select(0, keep)
        logps = z.gather(1, y.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=1)  # (n,)
        return _per_segment(logps, segments if all_kept else segments.index_select(0, keep), num_segments)


def fused_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segments: torch.Tensor,
    num_segments: int,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps(hidden @ weight.T + bias, targets, segments, num_segments)`` without the logits.

    Shapes: ``hidden`` (M, D) the hidden states of the M scored positions, ``weight`` (V, D) the
    LM head, ``bias`` (V,) or None, ``targets`` / ``segments`` (M,) int64 as in
    :func:`sequence_logps`. Returns the same ``(sums, counts)`` (S,), the same values and the
    same gradients (to ``hidden``, ``weight`` and ``bias``), up to float rounding.

    Positions with segment -1 are dropped before the matmul (zero gradient). The counted rows go
    through the fused head of :func:`~losslab.losses.fused.fused_linear_cross_entropy` with its
    per-token path: ``chunk_size`` rows at a time (default
    :func:`~losslab.losses.fused.default_chunk_size`), vocabulary tiles on CPU, float32
    compute for 16-bit inputs, autocast switched off. The forward computes each position's
    ``log p(y) = -(lse - z_y)`` only; its custom autograd backward recomputes the chunks'
    logits with each position's upstream gradient ``g_m = d L / d sums[segments[m]]`` and
    returns ``dL/dz_m = g_m (e_y - softmax(z_m))`` folded into the gradients of ``hidden``,
    ``weight`` and ``bias`` (gradients in the inputs' dtypes). The gradients cannot be formed in
    the forward pass as for a scalar loss: ``g`` is per segment and is known only when the
    preference loss on the sums is differentiated. Under ``torch.no_grad`` (a reference model)
    only the forward runs. ``log p(y)`` is clamped at 0 from above (``z_y`` is not read from
    the logits that gave ``lse``, so rounding could make it +1e-6).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (M, D) and weight (V, D) do not match: {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must have shape (V,) = ({weight.shape[0]},)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    keep = _check_segments(hidden.shape[0], targets, segments, num_segments, weight.shape[0])
    all_kept = keep.numel() == hidden.shape[0]
    rows = hidden if all_kept else hidden.index_select(0, keep)  # (n, D)
    y = targets if all_kept else targets.index_select(0, keep)
    nll: torch.Tensor = _FusedLinearCrossEntropy.apply(rows, weight, bias, y, None, _LOG_PROB, chunk_size)
    return _per_segment(-nll, segments if all_kept else segments.index_select(0, keep), num_segments)


__all__ = ["fused_sequence_logps", "sequence_logps"]
