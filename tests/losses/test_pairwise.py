"""Pairwise and ranking losses against brute-force loops and torch.nn.functional."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losslab.losses import bradley_terry_loss, info_nce_loss, margin_ranking_loss, triplet_loss
from losslab.losses.pairwise import DISTANCES

N, D, M = 6, 3, 2
REDUCTIONS = ["mean", "sum", "none"]
COUNTS = [None, 4.0]


def pairs(gen: torch.Generator):
    chosen = torch.randn(N, generator=gen, dtype=torch.float64)
    rejected = torch.randn(N, generator=gen, dtype=torch.float64)
    margins = torch.rand(N, generator=gen, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, False, True])
    weights = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5
    return chosen, rejected, margins, mask, weights


def embeddings(gen: torch.Generator, count: int = N):
    return [torch.randn(count, D, generator=gen, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("margin", ["none", "per_pair", "constant"])
@pytest.mark.parametrize("center", [0.0, 0.01])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", COUNTS)
def test_bradley_terry_matches_brute_force(gen, reduce_like, margin, center, reduction, num_items):
    chosen, rejected, margins, mask, weights = pairs(gen)
    m = {"none": None, "per_pair": margins, "constant": 0.5}[margin]
    expected = torch.zeros(N, dtype=torch.float64)
    for i in range(N):
        m_i = 0.0 if m is None else (m if isinstance(m, float) else margins[i].item())
        x = chosen[i].item() - rejected[i].item() - m_i
        expected[i] = (math.log1p(math.exp(-x)) + center * (chosen[i].item() + rejected[i].item()) ** 2) * weights[i]
    got = bradley_terry_loss(
        chosen,
        rejected,
        margin=m,
        center_rewards_coefficient=center,
        mask=mask,
        weights=weights,
        reduction=reduction,
        num_items=num_items,
    )
    torch.testing.assert_close(got, reduce_like(expected, mask, reduction, num_items))


@pytest.mark.parametrize("margin", [0.0, 0.5])
@pytest.mark.parametrize("with_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", COUNTS)
def test_margin_ranking_matches_torch(gen, reduce_like, margin, with_target, reduction, num_items):
    chosen, rejected, _, mask, _ = pairs(gen)
    target = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0], dtype=torch.float64) if with_target else None
    reference_target = target if with_target else torch.ones(N, dtype=torch.float64)
    expected = F.margin_ranking_loss(chosen, rejected, reference_target, margin=margin, reduction="none")
    got = margin_ranking_loss(
        chosen, rejected, target, margin=margin, mask=mask, reduction=reduction, num_items=num_items
    )
    torch.testing.assert_close(got, reduce_like(expected, mask, reduction, num_items))


def brute_distance(a, b, distance):
    a, b = a.tolist(), b.tolist()
    sq = sum((x - y) ** 2 for x, y in zip(a, b))
    if distance == "euclidean":
        return math.sqrt(sq)
    if distance == "squared_euclidean":
        return sq
    if distance == "manhattan":
        return sum(abs(x - y) for x, y in zip(a, b))
    dot = sum(x * y for x, y in zip(a, b))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("margin", [1.0, 0.2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", COUNTS)
def test_triplet_matches_brute_force(gen, reduce_like, distance, swap, margin, reduction, num_items):
    a, p, n = embeddings(gen)
    mask = pairs(gen)[3]
    expected = torch.zeros(N, dtype=torch.float64)
    for i in range(N):
        d_neg = brute_distance(a[i], n[i], distance)
        if swap:
            d_neg = min(d_neg, brute_distance(p[i], n[i], distance))
        expected[i] = max(0.0, brute_distance(a[i], p[i], distance) - d_neg + margin)
    got = triplet_loss(
        a, p, n, margin=margin, distance=distance, swap=swap, mask=mask, reduction=reduction, num_items=num_items
    )
    torch.testing.assert_close(got, reduce_like(expected, mask, reduction, num_items))


@pytest.mark.parametrize("swap", [False, True])
def test_triplet_euclidean_agrees_with_torch(gen, swap):
    a, p, n = embeddings(gen)
    # torch adds eps = 1e-6 to the difference before the norm: agreement to that order
    expected = F.triplet_margin_loss(a, p, n, margin=1.0, swap=swap, reduction="none")
    torch.testing.assert_close(triplet_loss(a, p, n, swap=swap, reduction="none"), expected, rtol=0, atol=1e-5)


def brute_info_nce(q, k, negatives, mask, temperature, normalize, symmetric):
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v] if normalize else v

    qs, ks = [unit(v) for v in q.tolist()], [unit(v) for v in k.tolist()]
    ns = [unit(v) for v in negatives.tolist()] if negatives is not None else []

    def score(u, v):
        return sum(x * y for x, y in zip(u, v)) / temperature

    live = [j for j in range(len(qs)) if mask[j]]
    out = torch.zeros(len(qs), dtype=torch.float64)
    for i in live:
        row = [score(qs[i], ks[j]) for j in live] + [score(qs[i], n) for n in ns]
        loss = -score(qs[i], ks[i]) + math.log(sum(math.exp(s) for s in row))
        if symmetric:
            column = [score(qs[j], ks[i]) for j in live]
            loss = 0.5 * (loss - score(qs[i], ks[i]) + math.log(sum(math.exp(s) for s in column)))
        out[i] = loss
    return out


@pytest.mark.parametrize("temperature", [0.07, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("extra_negatives", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_info_nce_matches_brute_force(gen, reduce_like, temperature, normalize, symmetric, extra_negatives, reduction):
    q, k, _ = embeddings(gen)
    negatives = torch.randn(M, D, generator=gen, dtype=torch.float64) if extra_negatives else None
    mask = pairs(gen)[3]
    expected = brute_info_nce(q, k, negatives, mask.tolist(), temperature, normalize, symmetric)
    got = info_nce_loss(
        q,
        k,
        negatives=negatives,
        temperature=temperature,
        normalize=normalize,
        symmetric=symmetric,
        mask=mask,
        reduction=reduction,
    )
    torch.testing.assert_close(got, reduce_like(expected, mask, reduction))


def test_info_nce_without_mask_is_cross_entropy_over_in_batch_scores(gen):
    q, k, _ = embeddings(gen)
    scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / 0.1
    torch.testing.assert_close(info_nce_loss(q, k, temperature=0.1), F.cross_entropy(scores, torch.arange(N)))


def test_hand_worked_numbers():
    # Bradley-Terry: r_c - r_r = 1: -log sigmoid(1) = log(1 + e^-1); margin 1: log 2; centring adds c (1 + 0)^2
    one, zero = torch.tensor([1.0]), torch.tensor([0.0])
    assert bradley_terry_loss(one, zero).item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    assert bradley_terry_loss(one, zero).item() == pytest.approx(0.3132617, abs=1e-6)
    assert bradley_terry_loss(one, zero, margin=1.0, center_rewards_coefficient=0.01).item() == pytest.approx(
        math.log(2) + 0.01, rel=1e-6
    )
    assert margin_ranking_loss(torch.tensor([0.3]), torch.tensor([0.5]), margin=0.1).item() == pytest.approx(0.3)
    # a = (0, 0), p = (3, 4), n = (0, 1): distances 5 and 1 (euclidean), 25 and 1, 7 and 1 (manhattan)
    a, p, n = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])
    assert triplet_loss(a, p, n).item() == pytest.approx(5.0)
    assert triplet_loss(a, p, n, distance="squared_euclidean").item() == pytest.approx(25.0)
    assert triplet_loss(a, p, n, distance="manhattan").item() == pytest.approx(7.0)
    # cosine: a = e1, p = e2 (distance 1), n = e1 (distance 0), margin 0.5
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert triplet_loss(e1, e2, e1, distance="cosine", margin=0.5).item() == pytest.approx(1.5)
    # InfoNCE, queries = keys = (e1, e2), temperature 1: scores = I, loss = -1 + log(e + 1) = log(1 + e^-1)
    eye = torch.eye(2)
    assert info_nce_loss(eye, eye, temperature=1.0).item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_text_ids_keep_repeated_texts_out_of_a_querys_negatives(gen, symmetric):
    """Rows 0, 2 and 5 share a reply text, and row 1's reply is explicit negative 3: float64
    reference with those (query, column) scores set to -inf, values and gradients (gradcheck)."""
    q, k, n = (x.double() for x in embeddings(gen))
    key_ids = torch.tensor([7, 1, 7, 3, 4, 7])
    negative_ids = torch.tensor([9, 9, 8, 1, 6, 5])
    weights = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5

    def reference(q, k, n):
        qn, kn, nn = (F.normalize(x, dim=-1) for x in (q, k, n))
        scores = torch.cat([qn @ kn.T, qn @ nn.T], dim=1) / 0.1  # (N, N + N)
        same = key_ids[:, None] == key_ids[None, :]
        same.fill_diagonal_(False)
        excluded = torch.cat([same, key_ids[:, None] == negative_ids[None, :]], dim=1)
        forward = F.cross_entropy(scores.masked_fill(excluded, -torch.inf), torch.arange(N), reduction="none")
        if not symmetric:
            return (weights * forward).sum() / N
        backward = F.cross_entropy((kn @ qn.T / 0.1).masked_fill(same, -torch.inf), torch.arange(N), reduction="none")
        return (weights * 0.5 * (forward + backward)).sum() / N

    def loss(q, k, n):
        return info_nce_loss(
            q,
            k,
            negatives=n,
            temperature=0.1,
            symmetric=symmetric,
            key_ids=key_ids,
            negative_ids=negative_ids,
            weights=weights,
        )

    leaves = [x.clone().requires_grad_() for x in (q, k, n)]
    got, want = loss(*leaves), reference(*leaves)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(g, w)
    assert torch.autograd.gradcheck(loss, tuple(leaves))
    without = info_nce_loss(q, k, negatives=n, temperature=0.1, symmetric=symmetric, weights=weights)
    assert float(without) > float(got.detach()) + 1e-3  # the false negatives raise the loss
    with pytest.raises(ValueError, match="key_ids must be integer ids"):
        info_nce_loss(q, k, key_ids=key_ids[:3])
    with pytest.raises(ValueError, match="negative_ids needs key_ids"):
        info_nce_loss(q, k, negatives=n, negative_ids=negative_ids)


def test_info_nce_masked_rows_are_not_negatives(gen):
    q, k, _ = embeddings(gen)
    mask = torch.tensor([True, True, True, False, False, False])
    torch.testing.assert_close(info_nce_loss(q, k, mask=mask), info_nce_loss(q[:3], k[:3]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: triplet_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), distance="hamming"),
            "distance must be one of .*'hamming'",
        ),
        (lambda: info_nce_loss(torch.zeros(2, 2), torch.zeros(2, 2), temperature=0.0), "temperature must be > 0"),
        (lambda: bradley_terry_loss(torch.zeros(2), torch.zeros(3)), r"shapes must match: rewards_chosen \(2,\)"),
        (lambda: margin_ranking_loss(torch.zeros(2), torch.zeros(2), margin=-1.0), "margin must be >= 0"),
    ],
)
def test_rejects_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_trailing_dim_of_one_is_not_broadcast_against_per_pair_values(gen):
    """(N, 1) rewards with (N,) margins once broadcast to (N, N): a wrong loss and no error."""
    chosen, rejected, margins, mask, weights = pairs(gen)
    target = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    bt = -F.logsigmoid(chosen - rejected - margins) * weights
    mr = F.margin_ranking_loss(chosen, rejected, target, margin=0.2, reduction="none")
    for column in ((lambda t: t[:, None]), (lambda t: t)):
        for per_pair in ((lambda t: t), (lambda t: t[:, None])):
            got = bradley_terry_loss(
                column(chosen), column(rejected), margin=per_pair(margins), mask=mask, weights=weights, reduction="none"
            )
            torch.testing.assert_close(got.reshape(N), torch.where(mask, bt, 0.0))
            got = margin_ranking_loss(column(chosen), column(rejected), per_pair(target), margin=0.2, reduction="none")
            torch.testing.assert_close(got.reshape(N), mr)
    with pytest.raises(ValueError, match=r"margin \(5,\) does not match the pairs \(6, 1\)"):
        bradley_terry_loss(chosen[:, None], rejected[:, None], margin=margins[:5])
    with pytest.raises(ValueError, match=r"target \(6, 2\) does not match the pairs \(6,\)"):
        margin_ranking_loss(chosen, rejected, target[:, None].expand(N, 2))


def test_nan_in_masked_pairs_reaches_neither_loss_nor_gradients(gen):
    """docs/losses.md: a NaN in a padded item cannot leak; not into the gradients either."""
    chosen, rejected, margins, mask, weights = pairs(gen)
    a, p, n = embeddings(gen)
    nan = torch.tensor(float("nan"), dtype=torch.float64)

    def poison(t):
        return torch.where(mask.reshape(-1, *([1] * (t.ndim - 1))), t, nan).requires_grad_()

    def clean(t):
        return t.clone().requires_grad_()

    def check(fn, reference, tensors):
        inputs = [poison(t) for t in tensors]
        got = fn(*inputs)
        got_grads = torch.autograd.grad(got, inputs)
        exact = [clean(t) for t in tensors]
        want = reference(*exact)
        torch.testing.assert_close(got, want)
        for g, wg in zip(got_grads, torch.autograd.grad(want, exact)):
            torch.testing.assert_close(g, wg)
            assert (g[~mask] == 0).all()

    # plain PyTorch on the trained pairs only, in float64
    keep = mask.nonzero().squeeze(1)
    count = len(keep)
    check(
        lambda c, r, m, w: bradley_terry_loss(c, r, margin=m, mask=mask, weights=w, center_rewards_coefficient=0.1),
        lambda c, r, m, w: ((-F.logsigmoid(c - r - m) + 0.1 * (c + r).square()) * w)[keep].sum() / count,
        (chosen, rejected, margins, weights),
    )
    check(
        lambda c, r, w: margin_ranking_loss(c, r, margin=0.5, mask=mask, weights=w),
        lambda c, r, w: (
            (F.margin_ranking_loss(c, r, torch.ones(N, dtype=torch.float64), margin=0.5, reduction="none") * w)[
                keep
            ].sum()
            / count
        ),
        (chosen, rejected, weights),
    )
    check(
        lambda a, p, n: triplet_loss(a, p, n, distance="cosine", mask=mask),
        lambda a, p, n: (1.0 - F.cosine_similarity(a, p) + F.cosine_similarity(a, n)).clamp(min=0)[keep].mean(),
        (a, p, n),
    )
    check(
        lambda q, k: info_nce_loss(q, k, temperature=0.5, symmetric=True, mask=mask),
        lambda q, k: (
            0.5
            * sum(
                F.cross_entropy(s, torch.arange(count))
                for s in (
                    F.normalize(q[keep]) @ F.normalize(k[keep]).T / 0.5,
                    F.normalize(k[keep]) @ F.normalize(q[keep]).T / 0.5,
                )
            )
        ),
        (a, p),
    )


def test_rejects_non_finite_options():
    q = torch.randn(3, 2)
    for temperature in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"temperature must be a finite number; got {temperature}"):
            info_nce_loss(q, q, temperature=temperature)
    with pytest.raises(ValueError, match="margin must be a finite number; got nan"):
        triplet_loss(q, q, q, margin=float("nan"))
    with pytest.raises(ValueError, match="center_rewards_coefficient must be a finite number; got nan"):
        bradley_terry_loss(q[:, 0], q[:, 1], center_rewards_coefficient=float("nan"))
