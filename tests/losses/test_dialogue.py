"""The dialogue terms (consistency, semantic L2, semantic alignment) against brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from losslab.losses import consistency_loss, semantic_alignment_loss, semantic_l2_loss
from losslab.losses.dialogue import DIVERGENCES

B, T, V, D = 3, 6, 4, 5
REDUCTIONS = ["mean", "sum", "none"]
COUNTS = [None, 4.0]


def dialogue_batch(gen: torch.Generator):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    features = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    trained = torch.tensor(
        [[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool
    )  # row 2 has no adjacent trained pair
    attention = torch.tensor([[1] * 6, [1] * 6, [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return logits, features, trained, attention


def divergence(p, q, kind):
    if kind == "kl":
        return sum(a * math.log(a / b) for a, b in zip(p, q))
    if kind == "l1":
        return sum(abs(a - b) for a, b in zip(p, q))
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * divergence(p, m, "kl") + 0.5 * divergence(q, m, "kl")


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", COUNTS)
def test_consistency_matches_brute_force(gen, reduce_like, kind, reduction, num_items):
    logits, _, trained, _ = dialogue_batch(gen)
    probs = torch.softmax(logits, dim=-1)
    expected = torch.zeros(B, T - 1, dtype=torch.float64)
    pairs = torch.zeros(B, T - 1, dtype=torch.bool)
    for b in range(B):
        for t in range(T - 1):
            if trained[b, t] and trained[b, t + 1]:
                pairs[b, t] = True
                expected[b, t] = divergence(probs[b, t].tolist(), probs[b, t + 1].tolist(), kind)
    assert pairs.sum() == 4  # (0,2-3), (0,3-4), (1,1-2), (1,4-5): never across the gap at (1,3)
    got = consistency_loss(logits, trained, divergence=kind, reduction=reduction, num_items=num_items)
    torch.testing.assert_close(got, reduce_like(expected, pairs, reduction, num_items))


def test_consistency_kl_agrees_with_torch_kl_div(gen):
    logits, _, _, _ = dialogue_batch(gen)
    log_p = torch.log_softmax(logits, dim=-1)
    expected = F.kl_div(log_p[:, 1:], log_p[:, :-1], log_target=True, reduction="none").sum(-1)  # KL(p_t || p_t+1)
    all_trained = torch.ones(B, T, dtype=torch.bool)
    torch.testing.assert_close(consistency_loss(logits, all_trained, divergence="kl", reduction="none"), expected)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.1, 30.0))
def test_consistency_js_is_symmetric_and_bounded(seed, scale):
    logits = torch.randn(1, 2, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    mask = torch.ones(1, 2, dtype=torch.bool)
    forward = consistency_loss(logits, mask, divergence="js")
    backward = consistency_loss(logits.flip(1), mask, divergence="js")
    torch.testing.assert_close(forward, backward)
    assert -1e-12 <= forward.item() <= math.log(2) + 1e-12
    assert 0.0 <= consistency_loss(logits, mask, divergence="l1").item() <= 2.0 + 1e-12


def masked_mean(rows, keep):
    kept = [row for row, k in zip(rows, keep) if k]
    return [sum(col) / len(kept) for col in zip(*kept)] if kept else None


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", COUNTS)
def test_semantic_l2_matches_brute_force(gen, reduce_like, reduction, num_items):
    _, features, trained, attention = dialogue_batch(gen)
    context = attention & ~trained
    context[2] = False  # a sequence without context is skipped
    expected = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        pooled = masked_mean(features[b].tolist(), context[b].tolist())
        if pooled is not None:
            expected[b] = sum(x * x for x in pooled) / D
    got = semantic_l2_loss(features, context, reduction=reduction, num_items=num_items)
    torch.testing.assert_close(got, reduce_like(expected, context.any(-1), reduction, num_items))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", COUNTS)
def test_semantic_alignment_matches_brute_force(gen, reduce_like, reduction, num_items):
    _, features, trained, attention = dialogue_batch(gen)
    context = attention & ~trained
    response = trained.clone()
    response[1] = False  # no response: skipped
    expected = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        r = masked_mean(features[b].tolist(), response[b].tolist())
        c = masked_mean(features[b].tolist(), context[b].tolist())
        if r is not None and c is not None:
            cos = sum(x * y for x, y in zip(r, c)) / math.sqrt(sum(x * x for x in r) * sum(y * y for y in c))
            expected[b] = 1 - cos
    got = semantic_alignment_loss(features, context, response, reduction=reduction, num_items=num_items)
    torch.testing.assert_close(got, reduce_like(expected, response.any(-1) & context.any(-1), reduction, num_items))


def test_hand_worked_numbers():
    # p = softmax(0, 0) = (1/2, 1/2), q = softmax(0, ln 3) = (1/4, 3/4)
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert consistency_loss(logits, mask, divergence="kl").item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert consistency_loss(logits, mask, divergence="l1").item() == pytest.approx(0.5, rel=1e-6)
    # m = (3/8, 5/8)
    js = 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)) + 0.5 * (
        0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    )
    assert consistency_loss(logits, mask, divergence="js").item() == pytest.approx(js, rel=1e-6)
    assert js == pytest.approx(0.5 * 0.032269 + 0.5 * 0.035375, abs=1e-6)  # = 0.0338221
    # context rows (1, 2), (3, 4) pool to (2, 3): mean of squares (4 + 9) / 2
    features = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [1.0, 1.0]]])
    context = torch.tensor([[True, True, False]])
    assert semantic_l2_loss(features, context).item() == pytest.approx(6.5)
    # context pools to (1, 0), response to (1, 1): 1 - 1/sqrt(2)
    features = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert semantic_alignment_loss(features, torch.tensor([[True, False]]), torch.tensor([[False, True]])).item() == (
        pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    )


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divergence must be one of js, kl, l1"):
        consistency_loss(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), divergence="cross")
    with pytest.raises(ValueError, match="do not align"):
        semantic_l2_loss(torch.zeros(1, 2, 3), torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["js", "kl"])
def test_consistency_with_a_minus_inf_logit_drops_that_token(gen, kind):
    """A token masked to -inf at both positions (p = q = 0) adds 0 log 0 = 0, not NaN."""
    finite = torch.randn(1, 3, V, generator=gen, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    logits = torch.cat([finite, torch.full((1, 3, 1), float("-inf"), dtype=torch.float64)], dim=-1).requires_grad_()
    got = consistency_loss(logits, mask, divergence=kind)
    (grad,) = torch.autograd.grad(got, logits)
    # plain PyTorch on the finite logits: F.kl_div(log q, log p) = KL(p || q)
    exact = finite.clone().requires_grad_()
    log_p, log_q = torch.log_softmax(exact[:, :-1], -1), torch.log_softmax(exact[:, 1:], -1)
    if kind == "kl":
        want = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()
    else:
        log_m = torch.log((log_p.exp() + log_q.exp()) / 2)
        want = (
            0.5
            * (
                F.kl_div(log_m, log_p, log_target=True, reduction="none")
                + F.kl_div(log_m, log_q, log_target=True, reduction="none")
            )
            .sum(-1)
            .mean()
        )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad[..., :V], torch.autograd.grad(want, exact)[0])
    assert (grad[..., V:] == 0).all()


def test_consistency_js_with_a_minus_inf_logit_at_one_position_only(gen):
    """p_v = 0 < q_v: js is finite (docs: "finite for any logits"), with correct gradients."""
    finite = torch.randn(1, 2, V, generator=gen, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)

    minus_inf = torch.zeros(1, 2, V, dtype=torch.bool)
    minus_inf[0, 0, 1] = True

    def js(z):
        return consistency_loss(z.masked_fill(minus_inf, float("-inf")), mask)

    p, q = torch.softmax(finite.masked_fill(minus_inf, float("-inf"))[0], -1)
    m = (p + q) / 2
    want = 0.5 * (torch.xlogy(p, p / m).sum() + torch.xlogy(q, q / m).sum())
    torch.testing.assert_close(js(finite), want)
    assert torch.autograd.gradcheck(js, (finite.clone().requires_grad_(),))


def test_nan_outside_the_masks_reaches_neither_loss_nor_gradients(gen):
    """A NaN hidden state at a padding position (e.g. a fully masked attention row) is
    selected away before pooling: features * mask would give NaN * 0 = NaN."""
    _, features, trained, attention = dialogue_batch(gen)
    context = attention & ~trained
    outside = ~(context | trained)
    assert outside.any()
    poisoned = features.masked_fill(outside[..., None], float("nan")).requires_grad_()
    clean = features.clone().requires_grad_()

    def pooled(x, keep):  # plain PyTorch masked mean, one sequence at a time
        return torch.stack([x[b][keep[b]].mean(0) if keep[b].any() else x.new_zeros(D) for b in range(B)])

    both = context.any(-1) & trained.any(-1)
    for fn, reference in (
        (
            lambda x: semantic_l2_loss(x, context),
            lambda x: pooled(x, context).square().mean(-1)[context.any(-1)].mean(),
        ),
        (
            lambda x: semantic_alignment_loss(x, context, trained),
            lambda x: (1 - F.cosine_similarity(pooled(x, trained), pooled(x, context)))[both].mean(),
        ),
    ):
        got = fn(poisoned)
        (got_grad,) = torch.autograd.grad(got, poisoned)
        want = reference(clean)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad, torch.autograd.grad(want, clean)[0])
