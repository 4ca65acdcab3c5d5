"""token_cross_entropy: brute-force reference, hand-worked numbers, gradients, dtypes and the
exactness of ``num_items`` under gradient accumulation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from losslab.losses import token_cross_entropy

B, T, V = 8, 6, 5
OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"focal_gamma": 2.0},
    {"focal_gamma": 0.5, "label_smoothing": 0.2},
    {"weighted": True},
    {"label_smoothing": 0.1, "z_loss": 1e-2, "focal_gamma": 2.0, "weighted": True},
]
OPTION_IDS = ["plain", "smoothing", "z_loss", "focal", "focal+smoothing", "weights", "all"]


def make_batch(gen: torch.Generator, dtype: torch.dtype = torch.float64):
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[torch.rand(B, T, generator=gen) < 0.3] = -100
    labels[2] = -100  # a sequence with nothing trained
    weights = torch.rand(B, T, generator=gen, dtype=torch.float64) + 0.5
    return logits.to(dtype), labels, weights.to(dtype)


def split_options(options: dict, weights: torch.Tensor) -> dict:
    kwargs = {k: v for k, v in options.items() if k != "weighted"}
    if options.get("weighted"):
        kwargs["token_weights"] = weights
    return kwargs


def brute_force_token_loss(
    logits, labels, weights, *, label_smoothing=0.0, z_loss=0.0, focal_gamma=0.0, weighted=False
):
    """Per-token losses from a Python loop over the formula in float64 (0 at ignored tokens)."""
    out = torch.zeros(labels.shape, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            row = [float(v) for v in logits[b, t]]
            lse = math.log(sum(math.exp(v) for v in row))
            neg_log_p = [lse - v for v in row]
            ce = (1 - label_smoothing) * neg_log_p[y] + label_smoothing * sum(neg_log_p) / len(row)
            focal = (1 - math.exp(-neg_log_p[y])) ** focal_gamma
            value = focal * ce + z_loss * lse**2
            out[b, t] = value * (float(weights[b, t]) if weighted else 1.0)
    return out


def expected_token_reduction(per_token, labels, reduction, num_items):
    mask = labels != -100
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / (num_items if num_items is not None else max(int(mask.sum()), 1))
    seq_means = [per_token[b].sum() / mask[b].sum() for b in range(labels.shape[0]) if mask[b].any()]
    return sum(seq_means) / (num_items if num_items is not None else len(seq_means))


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sequence"])
@pytest.mark.parametrize("num_items", [None, 11])
def test_matches_brute_force(gen, options, reduction, num_items):
    logits, labels, weights = make_batch(gen)
    per_token = brute_force_token_loss(logits, labels, weights, **options)
    expected = expected_token_reduction(per_token, labels, reduction, num_items)
    got = token_cross_entropy(
        logits, labels, reduction=reduction, num_items=num_items, **split_options(options, weights)
    )
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_matches_torch_cross_entropy(gen, label_smoothing):
    logits, labels, _ = make_batch(gen)
    expected = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), label_smoothing=label_smoothing)
    torch.testing.assert_close(token_cross_entropy(logits, labels, label_smoothing=label_smoothing), expected)


def test_hand_worked_number():
    # p = softmax([0, ln 3]) = (1/4, 3/4); label 1: -log p_y = ln(4/3), mean_v(-log p_v) = (ln 4 + ln(4/3)) / 2
    logits = torch.tensor([[0.0, math.log(3.0)]])
    labels = torch.tensor([1])
    nll, smooth, lse = math.log(4 / 3), (math.log(4) + math.log(4 / 3)) / 2, math.log(4)
    assert token_cross_entropy(logits, labels).item() == pytest.approx(nll, rel=1e-6)
    got = token_cross_entropy(logits, labels, label_smoothing=0.1, focal_gamma=2.0, z_loss=0.01)
    assert got.item() == pytest.approx((1 / 4) ** 2 * (0.9 * nll + 0.1 * smooth) + 0.01 * lse**2, rel=1e-6)
    assert got.item() == pytest.approx(0.0406314, abs=1e-6)  # 0.3426126 / 16 + 0.0192181


@pytest.mark.parametrize("reduction", ["mean", "sequence"])
def test_gradcheck_float64(gen, reduction):
    logits, labels, weights = make_batch(gen)
    logits = logits[:3, :4].clone().requires_grad_()
    options = {"label_smoothing": 0.1, "z_loss": 1e-2, "focal_gamma": 1.5, "token_weights": weights[:3, :4]}
    assert torch.autograd.gradcheck(
        lambda x: token_cross_entropy(x, labels[:3, :4], reduction=reduction, **options), (logits,)
    )


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "sequence"])
def test_all_ignored_gives_zero_loss_and_zero_gradients(gen, options, reduction):
    logits, _, weights = make_batch(gen, torch.float32)
    logits.requires_grad_()
    labels = torch.full((B, T), -100)
    loss = token_cross_entropy(logits, labels, reduction=reduction, **split_options(options, weights))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_and_bfloat16_inputs(gen, dtype):
    logits, labels, weights = make_batch(gen)
    low = logits.to(dtype).requires_grad_()
    options = {"label_smoothing": 0.1, "z_loss": 1e-2, "focal_gamma": 2.0, "token_weights": weights.to(dtype)}
    loss = token_cross_entropy(low, labels, **options)
    loss.backward()
    assert loss.dtype == torch.float32 and low.grad.dtype == dtype and torch.isfinite(low.grad).all()
    # computed in float32 from the given values: equal to the float64 loss of the same values
    exact = token_cross_entropy(
        low.detach().double(), labels, **{**options, "token_weights": weights.to(dtype).double()}
    )
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-6)


def accumulate(logits, labels, weights, options, reduction, bounds):
    """Sum of the micro-batch losses (sequence ranges ``bounds``) with num_items = global count."""
    mask = labels != -100
    global_count = int(mask.any(dim=-1).sum()) if reduction == "sequence" else int(mask.sum())
    total = 0.0
    for lo, hi in itertools.pairwise(bounds):
        kwargs = split_options(options, weights[lo:hi])
        total = total + token_cross_entropy(
            logits[lo:hi], labels[lo:hi], reduction=reduction, num_items=global_count, **kwargs
        )
    return total


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sequence"])
def test_four_micro_batches_add_up_to_the_whole_batch(gen, options, reduction):
    logits, labels, weights = make_batch(gen)
    logits.requires_grad_()
    whole = token_cross_entropy(logits, labels, reduction=reduction, **split_options(options, weights))
    (grad_whole,) = torch.autograd.grad(whole, logits)
    parts = accumulate(logits, labels, weights, options, reduction, [0, 2, 4, 6, 8])
    (grad_parts,) = torch.autograd.grad(parts, logits)
    assert abs(parts.item() - whole.item()) < 1e-6
    torch.testing.assert_close(grad_parts, grad_whole, rtol=0, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    cuts=st.lists(st.integers(1, B - 1), min_size=3, max_size=3, unique=True),
    option=st.sampled_from(range(len(OPTIONS))),
    reduction=st.sampled_from(["mean", "sequence"]),
    seed=st.integers(0, 2**16),
)
def test_any_four_way_split_adds_up(cuts, option, reduction, seed):
    """Uneven micro-batches too, whatever the cut points (some micro-batches may train nothing)."""
    logits, labels, weights = make_batch(torch.Generator().manual_seed(seed))
    whole = token_cross_entropy(logits, labels, reduction=reduction, **split_options(OPTIONS[option], weights))
    parts = accumulate(logits, labels, weights, OPTIONS[option], reduction, [0, *sorted(cuts), B])
    assert abs(float(parts) - whole.item()) < 1e-6


def test_token_weights_scale_the_numerator_only(gen):
    logits, labels, _ = make_batch(gen)
    half = token_cross_entropy(logits, labels, token_weights=torch.full((B, T), 0.5, dtype=torch.float64))
    torch.testing.assert_close(half, 0.5 * token_cross_entropy(logits, labels))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label_smoothing": 1.5}, r"label_smoothing must be in \[0, 1\]"),
        ({"z_loss": -1.0}, "z_loss must be >= 0"),
        ({"focal_gamma": -0.5}, "focal_gamma must be >= 0"),
        ({"reduction": "avg"}, "reduction must be one of .*'avg'"),
    ],
)
def test_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), **kwargs)


def test_focal_gamma_below_one_has_finite_gradients_at_certain_tokens():
    """gamma < 1: d/dp (1 - p)^gamma is infinite at p_y = 1 (a logit margin of 30 in float32),
    but the loss vanishes faster there, so the gradient is ~0, not NaN. Also at an IGNORED
    row whose logits make its placeholder label 0 certain."""
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1, -100])
    loss = token_cross_entropy(logits, labels, focal_gamma=0.5)
    (grad,) = torch.autograd.grad(loss, logits)
    # float64 reference on the trained rows: there 1 - p_y = 3e-13 > 0, no singularity
    exact = logits.detach()[:2].double().requires_grad_()
    log_p = torch.log_softmax(exact, dim=-1).gather(-1, labels[:2, None]).squeeze(-1)
    want = ((1 - log_p.exp()).pow(0.5) * -log_p).mean()
    (want_grad,) = torch.autograd.grad(want, exact)
    torch.testing.assert_close(loss.double(), want)
    torch.testing.assert_close(grad[:2].double(), want_grad)
    assert (grad[2] == 0).all()


def test_nan_at_ignored_tokens_reaches_neither_loss_nor_gradients(gen):
    """Ignored logits and token weights are selected away BEFORE computing: a where after
    the fact would still send 0 * NaN back to them."""
    logits, labels, weights = make_batch(gen)
    ignored = labels == -100
    poisoned_logits = logits.masked_fill(ignored[..., None], float("nan"))
    poisoned_logits[2, 0, 1] = float("inf")  # sequence 2 is all ignored
    poisoned_weights = weights.masked_fill(ignored, float("nan"))
    for reduction in ("mean", "sequence", "none"):
        x, w = poisoned_logits.clone().requires_grad_(), poisoned_weights.clone().requires_grad_()
        got = token_cross_entropy(x, labels, token_weights=w, reduction=reduction)
        got_grads = torch.autograd.grad(got.sum(), (x, w))
        # plain PyTorch on the clean values: F.cross_entropy per token, zero where ignored
        clean_x, clean_w = logits.clone().requires_grad_(), weights.clone().requires_grad_()
        per_token = F.cross_entropy(clean_x.reshape(-1, V), labels.reshape(-1), reduction="none").reshape(B, T)
        per_token = per_token * torch.where(ignored, 0.0, clean_w)
        want = expected_token_reduction(per_token, labels, reduction, None)
        want_grads = torch.autograd.grad(want.sum(), (clean_x, clean_w))
        torch.testing.assert_close(got, want)
        for g, wg in zip(got_grads, want_grads):
            torch.testing.assert_close(g, wg)
        assert (got_grads[0][ignored] == 0).all() and (got_grads[1][ignored] == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"z_loss": float("nan")}, "z_loss must be >= 0 and finite; got nan"),
        ({"z_loss": float("inf")}, "z_loss must be >= 0 and finite; got inf"),
        ({"focal_gamma": float("nan")}, "focal_gamma must be >= 0 and finite; got nan"),
        ({"label_smoothing": float("nan")}, r"label_smoothing must be in \[0, 1\]; got nan"),
        ({"num_items": -5}, "num_items must be a finite number >= 0; got -5"),
        ({"num_items": torch.tensor(-5.0)}, "num_items must be a finite number >= 0"),
        ({"num_items": float("nan")}, "num_items must be a finite number >= 0; got nan"),
        ({"num_items": -1, "reduction": "sequence"}, "num_items must be a finite number >= 0; got -1"),
    ],
)
def test_rejects_non_finite_options_and_negative_counts(kwargs, message):
    """NaN passes every ``<`` check, and a negative count clamped to 1 turns mean into sum."""
    with pytest.raises(ValueError, match=message):
        token_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), **kwargs)


# --- DFT (dft=True) ----------------------------------------------------------------------------


def brute_force_dft(logits, labels, weights, *, z_loss=0.0, weighted=False):
    """Per-token DFT losses from a Python loop: p_y * (-log p_y) + z * lse^2 (0 at ignored tokens)."""
    out = torch.zeros(labels.shape, dtype=torch.float64)
    for b, t in itertools.product(range(labels.shape[0]), range(labels.shape[1])):
        y = int(labels[b, t])
        if y == -100:
            continue
        row = [float(v) for v in logits[b, t]]
        lse = math.log(sum(math.exp(v) for v in row))
        value = math.exp(row[y] - lse) * (lse - row[y]) + z_loss * lse**2
        out[b, t] = value * (float(weights[b, t]) if weighted else 1.0)
    return out


DFT_OPTIONS = [{}, {"z_loss": 1e-2}, {"weighted": True, "z_loss": 1e-3}]


@pytest.mark.parametrize("options", DFT_OPTIONS, ids=["plain", "z_loss", "weights+z_loss"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sequence"])
def test_dft_matches_brute_force_and_scales_the_gradient_by_p_y(gen, options, reduction):
    """Values from the loop; gradient per trained token = w * (p_y (p - e_y) + 2 z lse p) times
    the reduction's factor: DFT's probability is a constant (no gradient through it)."""
    logits, labels, weights = make_batch(gen)
    logits.requires_grad_()
    got = token_cross_entropy(logits, labels, dft=True, reduction=reduction, **split_options(options, weights))
    per_token = brute_force_dft(logits.detach(), labels, weights, **options)
    torch.testing.assert_close(got.detach(), expected_token_reduction(per_token, labels, reduction, None))
    upstream = torch.rand(got.shape, generator=gen, dtype=torch.float64) + 0.5
    (grad,) = torch.autograd.grad(got, logits, upstream)
    # the same reduction of per-token "losses" whose gradient is the DFT one, by autograd
    z = logits.detach().requires_grad_()
    p = torch.softmax(z, -1)
    mask = labels != -100
    safe = torch.where(mask, labels, 0)
    p_y = p.gather(-1, safe.unsqueeze(-1)).squeeze(-1).detach()
    lse = torch.logsumexp(z, -1)
    surrogate = p_y * (lse - z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)) + options.get("z_loss", 0.0) * lse**2
    surrogate = torch.where(mask, surrogate * (weights if options.get("weighted") else 1.0), 0.0)
    (want,) = torch.autograd.grad(expected_token_reduction(surrogate, labels, reduction, None), z, upstream)
    torch.testing.assert_close(grad, want)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label_smoothing": 0.1}, "dft does not compose with label_smoothing=0.1"),
        ({"focal_gamma": 2.0}, "dft does not compose with focal_gamma=2.0"),
        ({"label_smoothing": 0.1, "focal_gamma": 1.0}, "label_smoothing=0.1 and focal_gamma=1.0"),
    ],
)
def test_dft_refuses_label_smoothing_and_focal(kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), dft=True, **kwargs)
