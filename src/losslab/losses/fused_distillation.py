"""Fused distillation heads: :func:`distillation_loss` from the student's and the teacher's
hidden states and LM head weights, without either N x V logits.

``fused_linear_distillation(student_hidden, student_weight, teacher_hidden, teacher_weight,
labels, ...)`` equals ``distillation_loss(student_hidden @ student_weight.T (+ bias),
teacher_hidden @ teacher_weight.T, labels, ...)`` (same options, same result, same gradients)
but holds the logits of one chunk of trained rows at a time. It runs on the fused cross-entropy
head's protocol (``fused._ChunkedLoss``: gradients in the forward pass for ``mean`` / ``sum``,
recomputed in backward for ``none``); per chunk the row losses are
:func:`~losslab.losses.distillation.distillation_rows`, the formula of the plain loss, and
their gradient with respect to the chunk's student logits is taken by autograd on that chunk
(in closed form for forward KL, from a full teacher or a top-k) and pushed through the student
head by two matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from losslab.labels import IGNORE_INDEX
from losslab.losses.common import TeacherTopK, compute_dtype
from losslab.losses.distillation import (
    Divergence,
    TopK,
    check_distillation_options,
    check_teacher,
    check_topk_indices,
    distillation_rows,
    truncated_teacher,
)
from losslab.losses.fused import _reduction_scale, _without_autocast, chunked_loss
from losslab.losses.reduction import check_count, check_reduction

# Default chunk: trained rows whose student logits (compute dtype) take at most CHUNK_BYTES;
# the divergence keeps about ten tensors of that size alive for its gradient.
CHUNK_BYTES = 32 * 2**20
MAX_CHUNK_ROWS = 512


def default_distillation_chunk_size(num_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Trained rows per chunk: ``CHUNK_BYTES`` of logits in the compute dtype, 1 to 512 rows."""
    rows = CHUNK_BYTES // max(1, vocab * compute_dtype(dtype).itemsize)
    return max(1, min(num_rows, MAX_CHUNK_ROWS, rows))


def forward_kl_with_grad(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL rows ``T^2 KL(p_T || q_T)`` (r,) of student and teacher logits (r, V) (the
    compute dtype), and their gradient with respect to the student's logits times ``scale`` (r,):
    ``T scale (q_T - p_T)`` (r, V), in closed form (no autograd graph: the fused head's hot path,
    where autograd through the per-row formula cost 1.5x the plain loss). ``0 log 0 = 0``; a
    student probability of 0 where the teacher's is not gives inf, as :func:`distillation_loss`."""
    t = temperature
    log_q = torch.log_softmax(student / t if t != 1.0 else student, dim=-1)
    log_p = torch.log_softmax(teacher / t if t != 1.0 else teacher, dim=-1)
    p = log_p.exp()
    terms = p * (log_p - log_q)  # NaN where p = 0 and log_p = -inf: dropped below
    rows = torch.where(p > 0, terms, terms.new_zeros(())).sum(dim=-1)
    if t != 1.0:
        rows = rows * t**2
    grad = log_q.exp_().sub_(p).mul_(scale.unsqueeze(-1) * t)
    return rows, _without_teacherless_rows(grad, log_p)


def forward_kl_topk_with_grad(
    student: torch.Tensor, teacher: TeacherTopK, temperature: float, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL rows ``T^2 KL(p_T || q_T)`` (r,) against a teacher's top-k (logits and ids
    (r, k), renormalised over its k tokens), the student's logits (r, V) keeping their full
    vocabulary (the "rest" outcome has teacher probability 0 and adds nothing), and the gradient
    with respect to the student's logits times ``scale`` (r,): ``T scale (q_T - p~)`` (r, V),
    ``p~`` the teacher's k probabilities scattered into V. Closed form, as
    :func:`forward_kl_with_grad`: the same value as :func:`distillation_rows` (docs/losses.md)."""
    t = temperature
    s = student / t if t != 1.0 else student
    ids = teacher.indices.long()
    log_p = torch.log_softmax(teacher.logits.to(s.dtype) / t, dim=-1)  # (r, k)
    p = log_p.exp()
    lse = torch.logsumexp(s, dim=-1, keepdim=True)  # (r, 1)
    terms = p * (log_p - (s.gather(-1, ids) - lse))  # NaN where p = 0: dropped below
    rows = torch.where(p > 0, terms, terms.new_zeros(())).sum(dim=-1)
    if t != 1.0:
        rows = rows * t**2
    grad = (s - lse).exp_().scatter_add_(-1, ids, -p).mul_(scale.unsqueeze(-1) * t)
    return rows, _without_teacherless_rows(grad, log_p)


def _without_teacherless_rows(grad: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``grad`` with 0 in the rows whose teacher logits are all -inf (``log_p`` NaN there): the
    divergence drops every term of such a row (``0 log 0``), so it has loss 0 and gradient 0, as
    in :func:`distillation_loss`, not the NaN of ``q - p``."""
    empty = log_p[..., :1].isnan()  # (r, 1): log_softmax of an all -inf row is NaN throughout
    return grad.masked_fill_(empty, 0.0) if bool(empty.any()) else grad


@dataclass(frozen=True)
class _DistillationHead:
    """The chunked head on (student hidden (n, d), student weight (V, d), student bias (V,),
    teacher hidden (n, dt), teacher weight (V, dt), teacher bias (V,), top-k logits (n, k),
    top-k ids (n, k)): the teacher is the hidden states and weight (and bias), or the top-k
    (the others None)."""

    divergence: str
    beta: float
    temperature: float
    top_k: int | None
    chunk_size: int | None

    def _rows(self, student: torch.Tensor, teacher: torch.Tensor | TeacherTopK) -> torch.Tensor:
        return distillation_rows(
            student, teacher, divergence=self.divergence, beta=self.beta, temperature=self.temperature, top_k=self.top_k
        )

    def run(
        self, tensors: tuple[torch.Tensor | None, ...], row_scale: torch.Tensor | None, needs: tuple[bool, ...]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        hidden, weight, bias, t_hidden, t_weight, t_bias, topk_logits, topk_ids = tensors
        assert hidden is not None and weight is not None
        with _without_autocast(hidden.device):
            teacher = (t_hidden, t_weight, t_bias, topk_logits, topk_ids)
            return self._run(hidden, weight, bias, teacher, row_scale, needs)

    def _run(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        teacher_side: tuple[torch.Tensor | None, ...],
        row_scale: torch.Tensor | None,
        needs: tuple[bool, ...],
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        t_hidden, t_weight, t_bias, topk_logits, topk_ids = teacher_side
        n, d = hidden.shape
        vocab = weight.shape[0]
        cdtype = compute_dtype(hidden.dtype)
        device = hidden.device
        want = row_scale is not None
        g_hidden = torch.zeros(n, d, dtype=cdtype, device=device) if want and needs[0] else None
        g_weight = torch.zeros(vocab, d, dtype=cdtype, device=device) if want and needs[1] else None
        g_bias = torch.zeros(vocab, dtype=cdtype, device=device) if want and needs[2] else None
        row_loss = torch.zeros(n, dtype=cdtype, device=device)
        grads: list[torch.Tensor | None] = [g_hidden, g_weight, g_bias, None, None, None, None, None]
        if n == 0:
            return row_loss, grads
        w = weight.to(cdtype)  # one float32 copy of a 16-bit weight (no copy in float32)
        b = bias.to(cdtype) if bias is not None else None
        tw = t_weight.to(cdtype) if t_weight is not None else None
        tb = t_bias.to(cdtype) if t_bias is not None else None
        rows = self.chunk_size or default_distillation_chunk_size(n, vocab, hidden.dtype)
        for s in range(0, n, min(rows, n)):
            e = min(s + rows, n)
            h = hidden[s:e].to(cdtype)
            z = h @ w.T if b is None else torch.addmm(b, h, w.T)  # (r, V) the chunk's student logits
            teacher: torch.Tensor | TeacherTopK
            if tw is not None:
                assert t_hidden is not None
                th = t_hidden[s:e].to(cdtype)
                teacher = th @ tw.T if tb is None else torch.addmm(tb, th, tw.T)  # (r, V)
            else:
                assert topk_logits is not None and topk_ids is not None
                teacher = TeacherTopK(topk_logits[s:e], topk_ids[s:e])
            if row_scale is None:
                row_loss[s:e] = self._rows(z, teacher)
                continue
            if self.divergence == "forward_kl":
                teacher = truncated_teacher(teacher, self.top_k)
                if isinstance(teacher, TeacherTopK):
                    row_loss[s:e], g_z = forward_kl_topk_with_grad(z, teacher, self.temperature, row_scale[s:e])
                else:
                    row_loss[s:e], g_z = forward_kl_with_grad(z, teacher, self.temperature, row_scale[s:e])
                del z, teacher
            else:
                z.requires_grad_(True)
                with torch.enable_grad():
                    loss = self._rows(z, teacher)
                    (g_z,) = torch.autograd.grad(loss, z, grad_outputs=row_scale[s:e])
                row_loss[s:e] = loss.detach()
                del loss, z, teacher
            if g_hidden is not None:
                torch.mm(g_z, w, out=g_hidden[s:e])
            if g_weight is not None:
                g_weight.addmm_(g_z.T, h)
            if g_bias is not None:
                g_bias.add_(g_z.sum(dim=0))
        return row_loss, grads


def fused_linear_distillation(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    teacher_topk: TeacherTopK | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: TopK = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``distillation_loss(student_hidden @ student_weight.T (+ student_bias), teacher_hidden @
    teacher_weight.T (+ teacher_bias), labels, ...)`` without either logits tensor.

    Shapes: ``student_hidden`` (..., d), ``student_weight`` (V, d), ``student_bias`` (V,) or
    None; the teacher as ``teacher_hidden`` (..., dt) with ``teacher_weight`` (V, dt) (its own
    width, the same vocabulary; ``teacher_bias`` (V,) or None), or as ``teacher_topk`` (:class:`TeacherTopK`, (..., k)), e.g.
    from a cache; ``labels`` (...) aligned (None: every position is trained). Options,
    reductions (mean | sum | none) and ``num_items`` as :func:`distillation_loss`.

    ``chunk_size``: trained rows per chunk (default :func:`default_distillation_chunk_size`).
    Ignored rows are dropped before the matmuls. Gradients reach the student's hidden states,
    weight and bias only (none for a weight or bias that does not require grad, e.g. a frozen
    LM head under LoRA, and no work is done for it); the teacher gets none. 16-bit inputs are
    computed and accumulated in float32 (float64 stays float64), under ``torch.autocast`` too.
    """
    check_reduction(reduction)
    check_distillation_options(divergence, beta, temperature, top_k)
    if student_hidden.dim() < 1 or student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student hidden (..., d) and weight (V, d) do not match: "
            f"{tuple(student_hidden.shape)}, {tuple(student_weight.shape)}"
        )
    lead = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("give teacher_hidden and teacher_weight together (or teacher_topk instead)")
    if teacher_hidden is not None and teacher_weight is not None:
        if teacher_weight.dim() != 2 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(
                f"teacher hidden (..., dt) and weight (V, dt) do not match: "
                f"{tuple(teacher_hidden.shape)}, {tuple(teacher_weight.shape)}"
            )
        if teacher_hidden.shape[:-1] != lead or teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"teacher (hidden {tuple(teacher_hidden.shape)}, weight {tuple(teacher_weight.shape)}) and student "
                f"(hidden {tuple(student_hidden.shape)}, weight {tuple(student_weight.shape)}) must score the same "
                "positions over the same vocabulary"
            )
    if (teacher_hidden is None) == (teacher_topk is None):
        raise ValueError("give exactly one teacher: teacher_hidden with teacher_weight, or teacher_topk")
    if teacher_topk is not None:
        check_teacher(torch.Size((*lead, vocab)), None, teacher_topk, top_k)
    elif top_k is not None and top_k > vocab:
        raise ValueError(f"top_k ({top_k}) exceeds the vocabulary ({vocab})")
    if labels is not None and labels.shape != lead:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and labels {tuple(labels.shape)} do not align")
    if student_bias is not None and student_bias.shape != (vocab,):
        raise ValueError(f"student bias {tuple(student_bias.shape)} must have shape (V,) = ({vocab},)")
    if teacher_bias is not None and teacher_hidden is None:
        raise ValueError("teacher_bias goes with teacher_hidden and teacher_weight (a top-k teacher has its logits)")
    if teacher_bias is not None and teacher_bias.shape != (vocab,):
        raise ValueError(f"teacher bias {tuple(teacher_bias.shape)} must have shape (V,) = ({vocab},)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    check_count(num_items)
    cdtype = compute_dtype(student_hidden.dtype)

    device = student_hidden.device
    mask = labels != ignore_index if labels is not None else torch.ones(lead, dtype=torch.bool, device=device)
    keep = mask.reshape(-1).nonzero().squeeze(1)  # (n,) trained rows
    total = mask.numel()
    all_kept = keep.numel() == total

    def rows_of(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(total, x.shape[-1])
        return flat if all_kept else flat.index_select(0, keep)

    teacher_rows: tuple[torch.Tensor | None, ...]
    if teacher_topk is not None:
        ids = rows_of(teacher_topk.indices)
        check_topk_indices(ids, vocab)
        teacher_rows = (None, None, None, rows_of(teacher_topk.logits.detach()), ids)
    else:
        assert teacher_hidden is not None and teacher_weight is not None
        t_bias = teacher_bias.detach() if teacher_bias is not None else None
        teacher_rows = (rows_of(teacher_hidden.detach()), teacher_weight.detach(), t_bias, None, None)
    head = _DistillationHead(divergence, float(beta), float(temperature), top_k, chunk_size)
    inputs = (rows_of(student_hidden), student_weight, student_bias, *teacher_rows)

    if reduction == "none":
        row_loss = chunked_loss(head, None, *inputs)
        per_token = row_loss if all_kept else row_loss.new_zeros(total).index_copy(0, keep, row_loss)
        return per_token.reshape(lead)
    row_scale = _reduction_scale(mask, reduction, num_items, cdtype).reshape(-1)
    if not all_kept:
        row_scale = row_scale.index_select(0, keep)
    tracked = (student_hidden, student_weight, student_bias)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tracked)):
        # no graph will be recorded (evaluation): the scalar path would compute the gradients
        row_loss = chunked_loss(head, None, *inputs)
        return (row_scale * row_loss).sum()
    return chunked_loss(head, row_scale, *inputs)


__all__ = ["default_distillation_chunk_size", "fused_linear_distillation"]
