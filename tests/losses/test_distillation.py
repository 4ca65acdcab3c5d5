"""Distillation losses against an independent float64 reference written here (probabilities,
``xlogy`` and explicit mixtures, no log-space tricks), and the fused heads against the plain loss.

Also: teacher == student, one-hot teachers, -inf logits, ``top_k`` (= V is the full loss, a
cached top-k is bit-equal to the live teacher), ``num_items`` under micro-batches, empty masks,
bfloat16 and autocast, a frozen head, the registry term and bad options.
"""

from __future__ import annotations

import math

import pytest
import torch

from losslab.errors import UserError
from losslab.losses import LossInputs, TeacherTopK, build_term, distillation_loss, token_cross_entropy
from losslab.losses.distillation import DIVERGENCES, distillation_rows
from losslab.losses.fused_distillation import (
    default_distillation_chunk_size,
    forward_kl_topk_with_grad,
    forward_kl_with_grad,
    fused_linear_distillation,
)

B, T, V, D, DT = 2, 6, 11, 5, 7
INF = float("inf")
# (divergence, beta): every divergence, beta at its end points and inside where it is read
CASES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.0),
    ("jsd", 0.3),
    ("jsd", 1.0),
    ("tvd", 0.5),
    ("skew_forward_kl", 0.1),
    ("skew_forward_kl", 0.0),
    ("skew_reverse_kl", 0.1),
    ("skew_reverse_kl", 0.0),
]
IDS = [f"{d}-{b}" for d, b in CASES]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the reference -------------------------------------------------------------------------


def ref_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(-1)


def ref_divergence(p: torch.Tensor, q: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Rows of probabilities (n, K) -> (n,), the definitions of docs/losses.md."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return ref_kl(p, q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return ref_kl(q, p)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if divergence == "skew_forward_kl":
        return ref_kl(p, beta * p + (1 - beta) * q)
    assert divergence == "skew_reverse_kl"
    return ref_kl(q, beta * q + (1 - beta) * p)


def reference(
    student, teacher, labels, divergence, beta, temperature=1.0, top_k=None, reduction="mean", num_items=None
):
    """Row by row in float64: softmax of logits / T, the truncated teacher for top_k (zero outside
    its top-k, the student's whole distribution; both renormalised on the top-k for reverse KL)."""
    s = student.double().reshape(-1, student.shape[-1]) / temperature
    t = teacher.double().reshape(-1, teacher.shape[-1]) / temperature
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    if top_k is not None:
        ids = t.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
        p = torch.where(keep, p, 0.0)
        p = p / p.sum(-1, keepdim=True)
        reverse = divergence == "reverse_kl" or (divergence, beta) in (("jsd", 1.0), ("skew_reverse_kl", 0.0))
        if reverse:
            p, q = p.gather(-1, ids), torch.softmax(s.gather(-1, ids), -1)
    rows = ref_divergence(p, q, divergence, beta) * temperature**2
    mask = (labels != -100).reshape(-1) if labels is not None else torch.ones(rows.shape, dtype=torch.bool)
    rows = torch.where(mask, rows, 0.0)
    if reduction == "none":
        return rows.reshape(student.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(float(num_items if num_items is not None else mask.sum()), 1.0)


def make(seed: int = 0, dtype=torch.float64, shape=(B, T), vocab=V, ignored=0.3, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignored] = -100
    labels.view(-1)[0] = 1  # at least one trained position
    return student.requires_grad_(), teacher, labels


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return torch.autograd.grad((loss * weights).sum(), inputs)


# --- plain loss vs reference ---------------------------------------------------------------


@pytest.mark.parametrize("divergence, beta", CASES, ids=IDS)
@pytest.mark.parametrize(
    "reduction, num_items, temperature, top_k",
    [("mean", None, 1.0, None), ("sum", None, 2.0, None), ("none", None, 0.7, 4), ("mean", 13, 1.5, 4)],
)
def test_equals_reference_values_and_gradients(divergence, beta, reduction, num_items, temperature, top_k):
    student, teacher, labels = make()
    opts = {"divergence": divergence, "beta": beta, "temperature": temperature, "top_k": top_k, "reduction": reduction}
    got = distillation_loss(student, teacher, labels, num_items=num_items, **opts)
    want = reference(student, teacher, labels, num_items=num_items, **opts)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads(got, student), grads(want, student), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("divergence, beta", CASES, ids=IDS)
@pytest.mark.parametrize("top_k", [None, 3])
def test_gradcheck_float64(divergence, beta, top_k):
    student, teacher, labels = make(shape=(2, 3), vocab=7, scale=1.0)

    def fn(s):
        return distillation_loss(s, teacher, labels, divergence=divergence, beta=beta, temperature=1.3, top_k=top_k)

    assert torch.autograd.gradcheck(fn, (student,))


def test_hand_worked_numbers():
    """p = (1/2, 1/2), q = (1/4, 3/4)."""
    teacher = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    student = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    expected = {
        "forward_kl": 0.5 * math.log(4 / 3),
        "reverse_kl": 0.25 * math.log(0.5) + 0.75 * math.log(1.5),
        "tvd": 0.25,
        # m = (3/8, 5/8): 0.5 KL(p || m) + 0.5 KL(q || m)
        "jsd": 0.5 * (0.5 * math.log(4 / 3) + 0.5 * math.log(4 / 5))
        + 0.5 * (0.25 * math.log(2 / 3) + 0.75 * math.log(6 / 5)),
    }
    for divergence, value in expected.items():
        got = distillation_loss(student, teacher, divergence=divergence, beta=0.5)
        assert float(got) == pytest.approx(value, rel=1e-12), divergence
    # temperature 2 doubles nothing here but the T^2 factor on the scaled logits' divergence
    t2 = distillation_loss(student * 2, teacher * 2, temperature=2.0)
    assert float(t2) == pytest.approx(4 * expected["forward_kl"], rel=1e-12)


@pytest.mark.parametrize("divergence, beta", CASES, ids=IDS)
def test_teacher_equal_to_student_gives_zero_loss_and_gradient(divergence, beta):
    student, _, labels = make()
    loss = distillation_loss(student, student.detach().clone(), labels, divergence=divergence, beta=beta, temperature=2)
    (grad,) = torch.autograd.grad(loss, student)
    assert abs(float(loss.detach())) < 1e-14
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-14)


@pytest.mark.parametrize("divergence, beta", CASES, ids=IDS)
def test_one_hot_teacher(divergence, beta):
    """A one-hot teacher (its other logits -inf): forward KL is the student's cross-entropy on
    the teacher's token, TVD is 1 - q_y, every divergence matches the reference."""
    student, _, labels = make()
    target = torch.randint(0, V, labels.shape, generator=torch.Generator().manual_seed(5))
    teacher = torch.full(student.shape, -INF, dtype=torch.float64).scatter(-1, target.unsqueeze(-1), 0.0)
    got = distillation_loss(student, teacher, labels, divergence=divergence, beta=beta)
    trained = torch.where(labels != -100, target, -100)
    if (divergence, beta) in (("reverse_kl", 0.5), ("jsd", 1.0), ("skew_reverse_kl", 0.0)):
        assert float(got.detach()) == INF  # KL(q || one-hot) is infinite: q has mass where p has none
        return
    want = reference(student, teacher, labels, divergence, beta)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(got, student)
    assert bool(torch.isfinite(grad).all())
    if divergence == "forward_kl":
        torch.testing.assert_close(got, token_cross_entropy(student, trained))
    if divergence == "tvd":
        q_y = torch.softmax(student, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(got, ((1 - q_y) * (labels != -100)).sum() / (labels != -100).sum())


@pytest.mark.parametrize("divergence, beta", CASES, ids=IDS)
@pytest.mark.parametrize("top_k", [None, 3])
def test_minus_inf_logits_of_a_masked_vocabulary(divergence, beta, top_k):
    """Columns at -inf in both (a padded / masked vocabulary) are probability 0: the loss equals
    the reference without those columns, gradients are finite and exactly 0 there."""
    student, teacher, labels = make()
    masked = torch.zeros(V, dtype=torch.bool)
    masked[[2, 7, 10]] = True
    s = student.detach().masked_fill(masked, -INF).requires_grad_()
    t = teacher.masked_fill(masked, -INF)
    got = distillation_loss(s, t, labels, divergence=divergence, beta=beta, top_k=top_k)
    want = reference(student[..., ~masked], teacher[..., ~masked], labels, divergence, beta, top_k=top_k)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(got, s)
    assert bool(torch.isfinite(grad).all())
    assert bool((grad[..., masked] == 0).all())


@pytest.mark.parametrize("divergence, beta", CASES, ids=IDS)
def test_top_k_equal_to_the_vocabulary_is_the_full_loss(divergence, beta):
    student, teacher, labels = make()
    full = distillation_loss(student, teacher, labels, divergence=divergence, beta=beta, temperature=1.5)
    top = distillation_loss(student, teacher, labels, divergence=divergence, beta=beta, temperature=1.5, top_k=V)
    torch.testing.assert_close(top, full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads(top, student), grads(full, student), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("divergence, beta", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_top_k_is_bit_equal_to_the_live_teacher(divergence, beta, dtype):
    """A cache holding torch.topk of the teacher's logits (k = 6) gives the live teacher's loss
    and gradients bit for bit, with the same top_k (4: the first 4 of the cache) or all of it."""
    student, teacher, labels = make(dtype=dtype)
    cache = TeacherTopK(*teacher.topk(6, dim=-1))
    for top_k in (4, 6):
        opts = {"divergence": divergence, "beta": beta, "temperature": 1.7, "top_k": top_k, "reduction": "none"}
        live = distillation_loss(student, teacher, labels, **opts)
        cached = distillation_loss(student, None, labels, teacher_topk=cache, **opts)
        assert torch.equal(live, cached)
        assert torch.equal(grads(live, student)[0], grads(cached, student)[0])
    compact = TeacherTopK(cache.logits, cache.indices.int())  # a cache may store int32 ids
    cached_all = distillation_loss(student, labels=labels, teacher_topk=compact, divergence=divergence, beta=beta)
    assert torch.equal(
        cached_all, distillation_loss(student, teacher, labels, divergence=divergence, beta=beta, top_k=6)
    )


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)])
def test_num_items_is_exact_under_micro_batches(divergence, beta):
    """Four micro-batches with num_items = the whole batch's trained count add up to the
    whole batch's mean (plain and fused)."""
    student, teacher, labels = make(shape=(8, 5))
    count = int((labels != -100).sum())
    whole = distillation_loss(student, teacher, labels, divergence=divergence, beta=beta, top_k=5)
    parts = sum(
        distillation_loss(s, t, y, divergence=divergence, beta=beta, top_k=5, num_items=count)
        for s, t, y in zip(student.split(2), teacher.split(2), labels.split(2))
    )
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads(parts, student), grads(whole, student), rtol=1e-12, atol=1e-14)
    h, w, ht, wt = heads(shape=(8, 5))
    fused_whole = fused_linear_distillation(h, w, ht, wt, labels, divergence=divergence, beta=beta)
    fused_parts = sum(
        fused_linear_distillation(hp, w, htp, wt, yp, divergence=divergence, beta=beta, num_items=count)
        for hp, htp, yp in zip(h.split(2), ht.split(2), labels.split(2))
    )
    torch.testing.assert_close(fused_parts, fused_whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("divergence, beta", CASES, ids=IDS)
def test_all_ignored_gives_zero_and_zero_gradients(divergence, beta):
    student, teacher, labels = make()
    nothing = torch.full_like(labels, -100)
    h, w, ht, wt = heads()
    for reduction in ("mean", "sum", "none"):
        opts = {"divergence": divergence, "beta": beta, "reduction": reduction}
        for top_k in (None, 3):
            loss = distillation_loss(student, teacher, nothing, top_k=top_k, **opts)
            (grad,) = grads(loss, student)
            assert bool((loss == 0).all()) and bool((grad == 0).all())
        fused = fused_linear_distillation(h, w, ht, wt, nothing, **opts)
        gh, gw = grads(fused, h, w)
        assert bool((fused == 0).all()) and bool((gh == 0).all()) and bool((gw == 0).all())


def test_labels_none_trains_every_position_and_dtypes():
    student, teacher, labels = make(dtype=torch.bfloat16, ignored=0.0)
    loss = distillation_loss(student, teacher)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, distillation_loss(student, teacher, torch.zeros_like(labels)))
    want = reference(student.float(), teacher.float(), None, "forward_kl", 0.5)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.dtype == torch.bfloat16


# --- fused heads ---------------------------------------------------------------------------


def heads(seed: int = 1, dtype=torch.float64, shape=(B, T)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.7).to(dtype).requires_grad_()
    ht = torch.randn(*shape, DT, generator=g, dtype=torch.float64).to(dtype)
    wt = (torch.randn(V, DT, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    return h, w, ht, wt


FUSED_OPTIONS = {
    "plain": {},
    "temperature_top_k": {"temperature": 2.0, "top_k": 4},
    "cached_top_k": {"temperature": 0.8, "cached": 5},
}


@pytest.mark.parametrize("divergence, beta", CASES, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(FUSED_OPTIONS))
def test_fused_equals_plain_float32(divergence, beta, reduction, option):
    _, _, labels = make()
    h, w, ht, wt = heads(dtype=torch.float32)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(3)).requires_grad_()
    opts = dict(FUSED_OPTIONS[option])
    cached = opts.pop("cached", None)
    opts.update(divergence=divergence, beta=beta, reduction=reduction, num_items=9 if reduction == "mean" else None)
    teacher_logits = ht @ wt.T
    topk = TeacherTopK(*teacher_logits.topk(cached, dim=-1)) if cached else None
    plain = distillation_loss(h @ w.T + bias, None if topk else teacher_logits, labels, teacher_topk=topk, **opts)
    teacher = (None, None) if topk else (ht, wt)
    fused = fused_linear_distillation(
        h, w, *teacher, labels, teacher_topk=topk, student_bias=bias, chunk_size=5, **opts
    )
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads(fused, h, w, bias), grads(plain, h, w, bias)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("jsd", 0.3), ("skew_reverse_kl", 0.1)])
def test_fused_gradcheck_float64(divergence, beta):
    _, _, labels = make()
    h, w, ht, wt = heads()

    def fn(hidden, weight):
        return fused_linear_distillation(
            hidden, weight, ht, wt, labels, divergence=divergence, beta=beta, top_k=4, chunk_size=4, reduction="none"
        )

    assert torch.autograd.gradcheck(fn, (h, w))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_bfloat16_autocast_accumulates_in_float32(reduction):
    """Under CPU bfloat16 autocast (and with bfloat16 inputs) the fused head computes in float32:
    it matches the float64 reference on the same values to float32 precision, where a bfloat16
    computation would be off by about 1e-2."""
    _, _, labels = make()
    h, w, ht, wt = heads(dtype=torch.float32)
    opts = {"divergence": "jsd", "beta": 0.3, "temperature": 1.5, "reduction": reduction}
    want = distillation_loss(h.double() @ w.double().T, ht.double() @ wt.double().T, labels, **opts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_distillation(h, w, ht, wt, labels, **opts)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads(got, h, w), grads(want, h, w)):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)
    hb, wb, htb, wtb = (x.detach().bfloat16() for x in (h, w, ht, wt))
    hb.requires_grad_()
    got16 = fused_linear_distillation(hb, wb, htb, wtb, labels, **opts)
    want16 = distillation_loss(hb.double() @ wb.double().T, htb.double() @ wtb.double().T, labels, **opts)
    assert got16.dtype == torch.float32
    torch.testing.assert_close(got16.double(), want16, rtol=1e-5, atol=1e-6)
    assert grads(got16, hb)[0].dtype == torch.bfloat16


def test_fused_frozen_weight_and_teacher_get_no_gradient():
    _, _, labels = make()
    h, w, ht, wt = heads()
    w.requires_grad_(False)
    ht.requires_grad_()
    loss = fused_linear_distillation(h, w, ht, wt, labels, divergence="reverse_kl")
    gh, ght = torch.autograd.grad(loss, (h, ht), allow_unused=True)
    assert gh is not None and ght is None
    want = distillation_loss(h @ w.T, ht @ wt.T, labels, divergence="reverse_kl")
    torch.testing.assert_close(gh, torch.autograd.grad(want, h)[0])


def test_fused_minus_inf_bias_and_cached_top_k():
    """A student vocabulary masked by a -inf bias, distilled from a cached top-k that avoids it."""
    _, _, labels = make()
    h, w, ht, wt = heads()
    bias = torch.zeros(V, dtype=torch.float64)
    bias[[0, 5]] = -INF
    teacher_logits = (ht @ wt.T).masked_fill(bias == -INF, -INF)
    cache = TeacherTopK(*teacher_logits.topk(4, dim=-1))
    for divergence in DIVERGENCES:
        fused = fused_linear_distillation(
            h, w, labels=labels, teacher_topk=cache, student_bias=bias, divergence=divergence
        )
        plain = distillation_loss(h @ w.T + bias, None, labels, teacher_topk=cache, divergence=divergence)
        torch.testing.assert_close(fused, plain)
        assert bool(torch.isfinite(torch.autograd.grad(fused, h)[0]).all())


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("top_k", [None, 4])
def test_fused_teacher_bias_equals_plain_logits_with_the_bias(divergence, beta, top_k):
    """A teacher LM head with a bias (Phi-2, GPT-J): the fused head adds it to every chunk's
    teacher logits, as the teacher's own logits have it."""
    _, _, labels = make()
    h, w, ht, wt = heads(dtype=torch.float32)
    t_bias = torch.randn(V, generator=torch.Generator().manual_seed(4)) * 3
    opts = {"divergence": divergence, "beta": beta, "top_k": top_k, "temperature": 1.5}
    plain = distillation_loss(h @ w.T, ht @ wt.T + t_bias, labels, **opts)
    fused = fused_linear_distillation(h, w, ht, wt, labels, teacher_bias=t_bias, chunk_size=5, **opts)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads(fused, h, w), grads(plain, h, w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    without = fused_linear_distillation(h, w, ht, wt, labels, chunk_size=5, **opts)
    assert not torch.allclose(without, plain, rtol=1e-3)  # the bias matters here
    with pytest.raises(ValueError, match="teacher bias"):
        fused_linear_distillation(h, w, ht, wt, labels, teacher_bias=t_bias[:-1])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_kl_top_k_closed_form_equals_autograd_of_the_formula(temperature):
    """The fused head's closed-form top-k forward KL (value and scaled gradient) against autograd
    through :func:`distillation_rows` in float64, with a teacher whose top-k holds -inf logits
    (probability 0) and a student with a -inf logit outside the top-k."""
    g = torch.Generator().manual_seed(5)
    student = torch.randn(7, V, generator=g, dtype=torch.float64)
    student[:, 0] = -INF
    values, ids = torch.randn(7, V, generator=g, dtype=torch.float64)[:, 1:].topk(4, dim=-1)
    values[2, 2:] = -INF
    teacher = TeacherTopK(values, ids + 1)
    scale = torch.rand(7, generator=g, dtype=torch.float64)
    rows, grad = forward_kl_topk_with_grad(student.clone(), teacher, temperature, scale)
    z = student.clone().requires_grad_()
    want = distillation_rows(z, teacher, divergence="forward_kl", beta=0.5, temperature=temperature, top_k=None)
    (want_grad,) = torch.autograd.grad(want, z, grad_outputs=scale)
    torch.testing.assert_close(rows, want.detach())
    torch.testing.assert_close(grad, want_grad)
    assert bool(torch.isfinite(grad).all())
    # a row whose teacher top-k is all -inf has nothing to match: loss 0 and gradient 0, as the formula
    values[4] = -INF
    rows, grad = forward_kl_topk_with_grad(student.clone(), TeacherTopK(values, ids + 1), temperature, scale)
    assert float(rows[4]) == 0 and bool((grad[4] == 0).all()) and bool(torch.isfinite(grad).all())
    full = torch.randn(7, V, generator=g, dtype=torch.float64)
    full[4] = -INF
    rows, grad = forward_kl_with_grad(student.clone(), full, temperature, scale)
    assert float(rows[4]) == 0 and bool((grad[4] == 0).all()) and bool(torch.isfinite(grad).all())


def test_fused_without_a_graph_and_default_chunk():
    _, _, labels = make()
    h, w, ht, wt = heads()
    with torch.no_grad():
        got = fused_linear_distillation(h, w, ht, wt, labels, divergence="tvd")
    torch.testing.assert_close(got, distillation_loss(h @ w.T, ht @ wt.T, labels, divergence="tvd"))
    every = fused_linear_distillation(h, w, ht, wt, divergence="jsd", beta=0.3, reduction="none")  # labels None
    torch.testing.assert_close(
        every, distillation_loss(h @ w.T, ht @ wt.T, divergence="jsd", beta=0.3, reduction="none")
    )
    assert every.shape == (B, T) and bool((every > 0).all())
    assert default_distillation_chunk_size(4096, 49152, torch.bfloat16) == 170
    assert default_distillation_chunk_size(10, 100, torch.float32) == 10


# --- checks, the registry ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"divergence": "kl"}, "divergence must be one of forward_kl, reverse_kl, jsd, tvd, skew_forward_kl"),
        ({"beta": 1.5}, "beta must be >= 0.0 and <= 1.0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"top_k": V + 1}, "top_k (12) exceeds the vocabulary (11)"),
        ({"reduction": "sequence"}, "reduction must be one of mean, sum, none"),
    ],
)
def test_rejects_bad_options(kwargs, message):
    student, teacher, labels = make()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distillation_loss(student, teacher, labels, **kwargs)


def test_rejects_mismatched_teachers():
    student, teacher, labels = make()
    with pytest.raises(ValueError, match=r"teacher logits \(2, 6, 12\) and student logits \(2, 6, 11\) differ"):
        distillation_loss(student, torch.zeros(B, T, V + 1), labels)
    with pytest.raises(ValueError, match="exactly one of teacher_logits and teacher_topk"):
        distillation_loss(student, teacher, labels, teacher_topk=TeacherTopK(*teacher.topk(3)))
    with pytest.raises(ValueError, match=r"exceeds the k \(3\)"):
        distillation_loss(student, None, labels, teacher_topk=TeacherTopK(*teacher.topk(3)), top_k=4)
    h, w, ht, wt = heads()
    with pytest.raises(ValueError, match="same vocabulary"):
        fused_linear_distillation(h, w, ht, wt[:-1], labels)


def test_registry_term_plain_fused_and_cached():
    _, _, labels = make()
    h, w, ht, wt = heads()
    term = build_term({"name": "distillation", "divergence": "skew_forward_kl", "beta": 0.1, "temperature": 2.0})
    plain = term(LossInputs(logits=h @ w.T, labels=labels, teacher_logits=ht @ wt.T, num_items=7))
    fused = term(
        LossInputs(
            hidden_states=h,
            lm_head_weight=w,
            labels=labels,
            teacher_hidden_states=ht,
            teacher_lm_head_weight=wt,
            num_items=7,
        )
    )
    torch.testing.assert_close(fused, plain)
    want = distillation_loss(
        h @ w.T, ht @ wt.T, labels, divergence="skew_forward_kl", beta=0.1, temperature=2, num_items=7
    )
    torch.testing.assert_close(plain, want)
    topk = build_term({"name": "distillation", "top_k": 3, "chunk_size": 2})
    cache = TeacherTopK(*(ht @ wt.T).topk(3))
    from_cache = topk(LossInputs(hidden_states=h, lm_head_weight=w, labels=labels, teacher_topk=cache))
    torch.testing.assert_close(from_cache, distillation_loss(h @ w.T, ht @ wt.T, labels, top_k=3))
    assert term.batch_additive


def test_registry_names_missing_fields_and_allowed_values():
    term = build_term({"name": "distillation"})
    problem = term.missing({"logits", "labels"})
    assert problem is not None and problem.startswith("term 'distillation' (distillation, divergence forward_kl) needs")
    assert "teacher_logits" in problem and "teacher_topk" in problem and "teacher_hidden_states" in problem
    assert term.missing({"hidden_states", "lm_head_weight", "labels", "teacher_topk"}) is None
    assert term.missing({"logits", "labels", "teacher_hidden_states", "teacher_lm_head_weight"}) is not None
    with pytest.raises(UserError, match="divergence="):
        build_term({"name": "distillation", "divergence": "kl"})
    with pytest.raises(UserError, match="'forward_kl'"):
        build_term({"name": "distillation", "divergence": "kl"})
    with pytest.raises(UserError, match="beta"):
        build_term({"name": "distillation", "beta": 2})
    with pytest.raises(UserError, match="reduction must be one of mean, sum"):
        build_term({"name": "distillation", "reduction": "none"})


def test_benchmark_script_runs_a_tiny_case_in_process():
    """benchmarks/bench_distillation.py: both methods on a tiny case, the ratios and the table."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_distillation.py"
    spec = importlib.util.spec_from_file_location("bench_distillation", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    setup = {"tokens": 16, "hidden": 8, "teacher_hidden": 12, "vocab": 64, "ignored_fraction": 0.25, "repeats": 1}
    results = [
        bench.run_case({**setup, "case": case, "method": method})
        for case in ("jsd", "forward_kl_top64_cached")
        for method in bench.METHODS
    ]
    rows = bench.ratios(results)
    assert [r["case"] for r in rows] == ["jsd", "forward_kl_top64_cached"]
    assert all(r["loss_rel_diff"] < 1e-5 and r["time_ratio"] > 0 for r in rows)
    report = {"setup": {**setup, "device": "cpu", "threads": 1, "command": "x"}, "results": results, "ratios": rows}
    assert "| jsd |" in bench.markdown(report)
