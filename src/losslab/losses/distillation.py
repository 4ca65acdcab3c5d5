"""Distillation losses: a divergence between the teacher's and the student's next-token
distributions at every trained position (forward / reverse KL, generalised JSD, total
variation, DistiLLM's skew KLs), from the full teacher logits or the teacher's top-k.

The maths, the top-k renormalisation and the temperature convention: docs/losses.md
(``distillation``). The per-row function :func:`distillation_rows` is shared by the plain
loss and the fused heads (``losses/fused_distillation.py``), so both compute one formula.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from annotated_types import Ge

from losslab.labels import IGNORE_INDEX
from losslab.losses.common import Positive, Probability, TeacherTopK, check_choice, check_range, compute_dtype
from losslab.losses.reduction import check_reduction, reduce_loss

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
TopK = Annotated[int, Ge(1)] | None
_NEG_INF = float("-inf")


def check_distillation_options(divergence: str, beta: float, temperature: float, top_k: int | None) -> None:
    """``ValueError`` naming the allowed values for a bad divergence, ``beta`` outside [0, 1],
    a ``temperature`` that is not a finite number > 0, or a ``top_k`` below 1."""
    check_choice("divergence", divergence, DIVERGENCES)
    check_range("beta", beta, 0.0, 1.0)
    check_range("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None; got {top_k!r}")


def renormalises_student(divergence: str, beta: float) -> bool:
    """True where the top-k loss renormalises the student over the teacher's k tokens: reverse
    KL, and the cases that are reverse KL (JSD at beta = 1, the skew reverse KL at beta = 0),
    where the student's mass outside the top-k would make the divergence infinite. Elsewhere
    the student keeps its full-vocabulary probabilities and its remaining mass is one more
    outcome (exact, see docs/losses.md)."""
    return (
        divergence == "reverse_kl"
        or (divergence == "jsd" and beta == 1.0)
        or (divergence == "skew_reverse_kl" and beta == 0.0)
    )


# ---------------------------------------------------------------------------------------------
# divergences between two rows of log-probabilities (n, K) -> (n,); -inf = probability 0


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a || b) = sum_v a_v (log a_v - log b_v)`` with ``0 log 0 = 0``: entries where
    ``a_v = 0`` add exactly 0 and send no gradient (their log-probs are replaced by 0 before
    computing, so ``-inf - -inf`` never appears); ``b_v = 0 < a_v`` gives inf, as it should."""
    keep = log_a > _NEG_INF
    zero = log_a.new_zeros(())
    a = torch.where(keep, log_a, zero)
    b = torch.where(keep, log_b, zero)
    return torch.where(keep, a.exp() * (a - b), zero).sum(dim=-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w a + (1 - w) b)`` elementwise, -inf where both are 0, with finite gradients."""
    if w == 1.0:
        return log_a
    if w == 0.0:
        return log_b
    some = (log_a > _NEG_INF) | (log_b > _NEG_INF)
    zero = log_a.new_zeros(())
    a = torch.where(some, log_a, zero) + math.log(w)
    b = torch.where(some, log_b, zero) + math.log1p(-w)
    return torch.where(some, torch.logaddexp(a, b), log_a.new_full((), _NEG_INF))


def divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """The divergence per row, ``log_p`` the teacher's log-probs, ``log_q`` the student's
    (n, K), each summing to 1 over the last dim (-inf allowed):

    - ``forward_kl``: ``KL(p || q)``; ``reverse_kl``: ``KL(q || p)``;
    - ``jsd`` (GKD's generalised JSD, TRL's convention): ``m = beta p + (1 - beta) q``,
      ``beta KL(p || m) + (1 - beta) KL(q || m)``; beta = 0 is exactly ``KL(p || q)`` and
      beta = 1 exactly ``KL(q || p)`` (for 0 < beta < 1 the value is ``~ beta KL(p || q)``
      near 0: like TRL, the end points are the KLs, not the limit);
    - ``tvd``: ``0.5 sum_v |p_v - q_v|``;
    - ``skew_forward_kl`` (DistiLLM): ``KL(p || beta p + (1 - beta) q)``;
    - ``skew_reverse_kl`` (DistiLLM): ``KL(q || beta q + (1 - beta) p)``.
    """
    if divergence == "forward_kl":
        return _kl(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl(log_q, log_p)
    if divergence == "jsd":
        if beta == 0.0:
            return _kl(log_p, log_q)
        if beta == 1.0:
            return _kl(log_q, log_p)
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    if divergence == "skew_forward_kl":
        return _kl(log_p, _log_mix(log_p, log_q, beta))
    if divergence == "skew_reverse_kl":
        return _kl(log_q, _log_mix(log_q, log_p, beta))
    raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")


# ---------------------------------------------------------------------------------------------
# rows of logits -> the two distributions the divergence compares


def _safe_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dim (keepdim), -inf for an all -inf row with zero gradient
    (torch's would send NaN back: ``exp(-inf - -inf)``)."""
    some = (x > _NEG_INF).any(dim=-1, keepdim=True)
    safe = torch.where(some, x, x.new_zeros(()))
    return torch.where(some, torch.logsumexp(safe, dim=-1, keepdim=True), x.new_full((), _NEG_INF))


def topk_log_probs(
    student: torch.Tensor, teacher: TeacherTopK, divergence: str, beta: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_p, log_q)`` of the teacher and the student on the teacher's top-k support.

    ``student`` (n, V) compute dtype, ``teacher`` logits / indices (n, k) (raw logits, cast
    here). Teacher: ``log_softmax(top-k logits / T)`` over its k tokens (renormalised: the
    truncated teacher is 0 elsewhere). Student, ``s = student / T``: where
    :func:`renormalises_student`, ``log_softmax(s[ids])`` over the same k tokens; otherwise its
    full-vocabulary log-probs ``s[ids] - logsumexp(s)`` plus one column for all the other
    tokens, ``logsumexp(s[others]) - logsumexp(s)`` (the teacher's is -inf there). With this
    column the divergence equals the full-vocabulary one against the truncated teacher.
    """
    cdtype = student.dtype
    ids = teacher.indices.long()  # a cache may store int32 ids; gather and scatter take int64
    log_p = torch.log_softmax(teacher.logits.to(cdtype) / temperature, dim=-1)
    scaled = student / temperature
    picked = scaled.gather(-1, ids)
    if renormalises_student(divergence, beta):
        return log_p, torch.log_softmax(picked, dim=-1)
    lse = _safe_logsumexp(scaled)
    others = scaled.scatter(-1, ids, _NEG_INF)
    log_q = torch.cat([picked, _safe_logsumexp(others)], dim=-1) - lse
    log_p = torch.cat([log_p, log_p.new_full((log_p.shape[0], 1), _NEG_INF)], dim=-1)
    return log_p, log_q


def truncated_teacher(teacher: torch.Tensor | TeacherTopK, top_k: int | None) -> torch.Tensor | TeacherTopK:
    """The teacher a loss with ``top_k`` compares against: full logits (n, V) unchanged when
    ``top_k`` is None, else its ``torch.topk`` as a :class:`TeacherTopK`; a cached top-k cut to
    its first ``top_k`` entries (they are descending). One function, so that a live and a
    cached teacher reach the divergence as the same tensors."""
    if isinstance(teacher, torch.Tensor):
        if top_k is None:
            return teacher
        values, indices = torch.topk(teacher, top_k, dim=-1)
        return TeacherTopK(values, indices)
    if top_k is not None and top_k < teacher.logits.shape[-1]:
        return TeacherTopK(teacher.logits[..., :top_k], teacher.indices[..., :top_k])
    return teacher


def distillation_rows(
    student: torch.Tensor,
    teacher: torch.Tensor | TeacherTopK,
    *,
    divergence: str,
    beta: float,
    temperature: float,
    top_k: int | None,
) -> torch.Tensor:
    """Per-row loss ``T^2 D(p_T, q_T)`` (n,), ``student`` (n, V) in its compute dtype, ``teacher``
    full logits (n, V) or a :class:`TeacherTopK` of (n, k) rows. A full teacher with ``top_k``
    goes through ``torch.topk`` and then the very code a cached top-k takes, so the two are
    bit-equal. Shared by :func:`distillation_loss` and the fused heads."""
    teacher = truncated_teacher(teacher, top_k)
    if isinstance(teacher, TeacherTopK):
        log_p, log_q = topk_log_probs(student, teacher, divergence, beta, temperature)
    else:
        log_p = torch.log_softmax(teacher.to(student.dtype) / temperature, dim=-1)
        log_q = torch.log_softmax(student / temperature, dim=-1)
    rows = divergence_rows(log_p, log_q, divergence, beta)
    if student.requires_grad and not rows.requires_grad:  # a skew KL at beta = 1 is 0 for any student:
        # keep the result on the graph (zero gradient) so that backward() works as for any beta
        rows = torch.where(torch.zeros_like(rows, dtype=torch.bool), student[..., 0], rows)
    return rows * temperature**2 if temperature != 1.0 else rows


def check_teacher(
    student_shape: torch.Size, teacher_logits: torch.Tensor | None, teacher_topk: TeacherTopK | None, top_k: int | None
) -> None:
    """``ValueError`` unless exactly one teacher is given and it matches the student
    ``(..., V)``: full logits of the same shape, or top-k logits and ids (..., k) with the
    student's leading shape and ``top_k <= k``."""
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("give exactly one of teacher_logits and teacher_topk")
    vocab = student_shape[-1]
    if teacher_logits is not None:
        if teacher_logits.shape != student_shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_shape)} differ: "
                "teacher and student must score the same positions over the same vocabulary"
            )
        if top_k is not None and top_k > vocab:
            raise ValueError(f"top_k ({top_k}) exceeds the vocabulary ({vocab})")
        return
    assert teacher_topk is not None
    logits, indices = teacher_topk
    if logits.shape != indices.shape or logits.shape[:-1] != student_shape[:-1]:
        raise ValueError(
            f"teacher top-k logits {tuple(logits.shape)} and indices {tuple(indices.shape)} must both be "
            f"(..., k) with the student's leading shape {tuple(student_shape[:-1])}"
        )
    if indices.dtype.is_floating_point:
        raise ValueError(f"teacher top-k indices must be integers; got {indices.dtype}")
    if top_k is not None and top_k > logits.shape[-1]:
        raise ValueError(f"top_k ({top_k}) exceeds the k ({logits.shape[-1]}) of the teacher's cached top-k")


def check_topk_indices(indices: torch.Tensor, vocab: int) -> None:
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise ValueError(f"teacher top-k indices must be in [0, {vocab}) (the student's vocabulary)")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    teacher_topk: TeacherTopK | None = None,
    divergence: Divergence = "forward_kl",
    beta: Probability = 0.5,
    temperature: Positive = 1.0,
    top_k: TopK = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence between the teacher's and the student's next-token distributions.

    Shapes: ``student_logits`` (..., V); the teacher as ``teacher_logits`` (..., V) or
    ``teacher_topk`` (:class:`TeacherTopK`: its raw top-k logits (..., k), before temperature,
    descending, and their vocabulary ids (..., k)); ``labels`` (...) aligned with the logits
    as for :func:`token_cross_entropy` (positions equal to ``ignore_index`` are not trained;
    None: every position is). The teacher gets no gradient.

    Per trained position, with ``p = softmax(teacher / T)``, ``q = softmax(student / T)``
    (``T = temperature``): ``l = T^2 D(p, q)``, ``D`` per ``divergence`` (see
    :func:`divergence_rows`; ``beta`` is JSD's interpolation, 0 = forward KL, 1 = reverse KL,
    or the skew of the skew KLs). The ``T^2`` factor (Hinton et al. 2015) keeps the
    gradient's scale independent of ``T``; ``T = 1`` is the plain divergence.
    ``top_k``: the teacher keeps its k most likely tokens, renormalised; the student is
    treated as :func:`topk_log_probs` says (``top_k = V`` is the full loss, and a cached top-k
    equals the live teacher with the same ``top_k`` bit for bit).

    Reduction: ``none`` (shape of ``labels``, 0 where not trained), ``sum``, ``mean`` = sum /
    ``num_items`` if given, else / the number of trained positions (at least 1). Computed in
    float32 (float64 stays float64); an all-ignored batch gives 0 and zero gradients; -inf
    logits (a masked vocabulary) count as probability 0 in every divergence (a token the
    teacher may emit but the student has at -inf makes KL(p || q) infinite, as it is).
    """
    check_reduction(reduction)
    check_distillation_options(divergence, beta, temperature, top_k)
    check_teacher(student_logits.shape, teacher_logits, teacher_topk, top_k)
    lead = student_logits.shape[:-1]
    if labels is not None and labels.shape != lead:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and labels {tuple(labels.shape)} do not align")
    cdtype = compute_dtype(student_logits)
    vocab = student_logits.shape[-1]
    mask = (
        labels != ignore_index
        if labels is not None
        else torch.ones(lead, dtype=torch.bool, device=student_logits.device)
    )
    trained = mask.reshape(-1)
    everything = bool(trained.all())

    def rows_of(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return flat if everything else flat[trained]

    student = rows_of(student_logits).to(cdtype)
    teacher: torch.Tensor | TeacherTopK
    if teacher_logits is not None:
        teacher = rows_of(teacher_logits.detach())
    else:
        assert teacher_topk is not None
        teacher = TeacherTopK(rows_of(teacher_topk.logits.detach()), rows_of(teacher_topk.indices))
        check_topk_indices(teacher.indices, vocab)
    per_row = distillation_rows(
        student, teacher, divergence=divergence, beta=beta, temperature=temperature, top_k=top_k
    )
    per_token = per_row.new_zeros(trained.shape).masked_scatter(trained, per_row).reshape(lead)
    return reduce_loss(per_token, mask, reduction, num_items)


__all__ = [
    "DIVERGENCES",
    "check_distillation_options",
    "distillation_loss",
    "distillation_rows",
    "divergence_rows",
    "truncated_teacher",
]
