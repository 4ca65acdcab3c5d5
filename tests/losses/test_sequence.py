"""Classification and regression heads against torch.nn.functional or brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losslab.losses import (
    binary_cross_entropy,
    binary_focal_loss,
    classification_cross_entropy,
    focal_loss,
    huber_loss,
    mse_loss,
    multiclass_hinge_loss,
)

N, C = 7, 4
REDUCTIONS = ["mean", "sum", "none"]
COUNTS = [None, 5.0]


def class_batch(gen: torch.Generator):
    logits = torch.randn(N, C, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, C, (N,), generator=gen)
    targets[[1, 4]] = -100
    weights = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5
    return logits, targets, weights


def label_batch(gen: torch.Generator):
    logits = torch.randn(N, C, generator=gen, dtype=torch.float64) * 2
    targets = (torch.rand(N, C, generator=gen) < 0.4).to(torch.float64)
    mask = torch.rand(N, C, generator=gen) < 0.7
    weights = torch.rand(N, 1, generator=gen, dtype=torch.float64) + 0.5  # per example, over labels
    return logits, targets, mask, weights


CE_OPTIONS = [
    {},
    {"class_weights": [2.0, 0.5, 1.0, 3.0]},
    {"label_smoothing": 0.2},
    {"class_weights": [2.0, 0.5, 1.0, 3.0], "label_smoothing": 0.2},
]


@pytest.mark.parametrize("options", CE_OPTIONS, ids=["plain", "class_weights", "smoothing", "both"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", COUNTS)
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_torch(gen, reduce_like, options, reduction, num_items, weighted):
    logits, targets, weights = class_batch(gen)
    w = torch.tensor(options["class_weights"], dtype=torch.float64) if "class_weights" in options else None
    per_item = F.cross_entropy(
        logits, targets, weight=w, label_smoothing=options.get("label_smoothing", 0.0), reduction="none"
    ) * (weights if weighted else 1.0)
    got = classification_cross_entropy(
        logits, targets, reduction=reduction, num_items=num_items, weights=weights if weighted else None, **options
    )
    torch.testing.assert_close(got, reduce_like(per_item, targets != -100, reduction, num_items))


def test_cross_entropy_mean_is_count_normalised_not_weight_normalised(gen):
    logits, targets, _ = class_batch(gen)
    w = torch.tensor([2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    got = classification_cross_entropy(logits, targets, class_weights=w)
    torch_sum = F.cross_entropy(logits, targets, weight=w, reduction="sum")
    torch.testing.assert_close(got, torch_sum / (targets != -100).sum())


def brute_focal(logits, targets, gamma, alpha, label_smoothing):
    out = torch.zeros(len(targets), dtype=torch.float64)
    for i, y in enumerate(targets.tolist()):
        if y == -100:
            continue
        row = logits[i].tolist()
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        ce = (1 - label_smoothing) * -math.log(p[y]) + label_smoothing * sum(-math.log(q) for q in p) / len(p)
        a = 1.0 if alpha is None else (alpha[y] if isinstance(alpha, list) else alpha)
        out[i] = a * (1 - p[y]) ** gamma * ce
    return out


FOCAL_OPTIONS = [
    {"gamma": 0.0},
    {"gamma": 2.0},
    {"gamma": 2.0, "alpha": 0.25},
    {"gamma": 1.5, "alpha": [0.1, 0.2, 0.3, 0.4]},
    {"gamma": 2.0, "label_smoothing": 0.1},
]


@pytest.mark.parametrize("options", FOCAL_OPTIONS, ids=["gamma0", "gamma2", "alpha", "alpha_per_class", "smoothing"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", COUNTS)
def test_focal_matches_brute_force(gen, reduce_like, options, reduction, num_items):
    logits, targets, _ = class_batch(gen)
    per_item = brute_focal(logits, targets, options["gamma"], options.get("alpha"), options.get("label_smoothing", 0.0))
    got = focal_loss(logits, targets, reduction=reduction, num_items=num_items, **options)
    torch.testing.assert_close(got, reduce_like(per_item, targets != -100, reduction, num_items))


def test_focal_with_gamma_zero_is_cross_entropy(gen):
    logits, targets, _ = class_batch(gen)
    torch.testing.assert_close(
        focal_loss(logits, targets, gamma=0.0, label_smoothing=0.1),
        classification_cross_entropy(logits, targets, label_smoothing=0.1),
    )


BCE_OPTIONS = [
    {},
    {"pos_weight": [1.0, 2.0, 0.5, 3.0]},
    {"label_smoothing": 0.1},
    {"pos_weight": 2.0, "label_smoothing": 0.1},
]


@pytest.mark.parametrize("options", BCE_OPTIONS, ids=["plain", "pos_weight", "smoothing", "both"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", COUNTS)
def test_binary_cross_entropy_matches_torch(gen, reduce_like, options, reduction, num_items):
    logits, targets, mask, weights = label_batch(gen)
    eps = options.get("label_smoothing", 0.0)
    pw = options.get("pos_weight")
    per_item = (
        F.binary_cross_entropy_with_logits(
            logits,
            targets * (1 - eps) + eps / 2,
            pos_weight=None if pw is None else torch.as_tensor(pw, dtype=torch.float64),
            reduction="none",
        )
        * weights
    )
    got = binary_cross_entropy(
        logits, targets, mask=mask, weights=weights, reduction=reduction, num_items=num_items, **options
    )
    torch.testing.assert_close(got, reduce_like(per_item, mask, reduction, num_items))


def brute_binary_focal(logits, targets, gamma, alpha):
    out = torch.zeros_like(logits)
    for index in range(logits.numel()):
        x, y = logits.view(-1)[index].item(), targets.view(-1)[index].item()
        p = 1 / (1 + math.exp(-x))
        p_t = p * y + (1 - p) * (1 - y)
        ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
        a_t = 1.0 if alpha is None else alpha * y + (1 - alpha) * (1 - y)
        out.view(-1)[index] = a_t * (1 - p_t) ** gamma * ce
    return out


@pytest.mark.parametrize("gamma, alpha", [(0.0, None), (2.0, None), (2.0, 0.25), (0.5, 0.9)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", COUNTS)
def test_binary_focal_matches_brute_force(gen, reduce_like, gamma, alpha, reduction, num_items):
    logits, targets, mask, _ = label_batch(gen)
    per_item = brute_binary_focal(logits, targets, gamma, alpha)
    got = binary_focal_loss(
        logits, targets, gamma=gamma, alpha=alpha, mask=mask, reduction=reduction, num_items=num_items
    )
    torch.testing.assert_close(got, reduce_like(per_item, mask, reduction, num_items))


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("margin", [1.0, 0.3])
@pytest.mark.parametrize("class_weights", [None, [2.0, 0.5, 1.0, 3.0]])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", COUNTS)
def test_multiclass_hinge_matches_torch(gen, reduce_like, squared, margin, class_weights, reduction, num_items):
    logits, targets, _ = class_batch(gen)
    trained = targets != -100
    w = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float64)
    per_item = torch.zeros(N, dtype=torch.float64)
    per_item[trained] = F.multi_margin_loss(
        logits[trained], targets[trained], p=2 if squared else 1, margin=margin, weight=w, reduction="none"
    )
    got = multiclass_hinge_loss(
        logits,
        targets,
        margin=margin,
        squared=squared,
        class_weights=class_weights,
        reduction=reduction,
        num_items=num_items,
    )
    torch.testing.assert_close(got, reduce_like(per_item, trained, reduction, num_items))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_items", COUNTS)
@pytest.mark.parametrize("delta", [None, 1.0, 0.4])
def test_regression_losses_match_torch(gen, reduce_like, reduction, num_items, delta):
    predictions = torch.randn(N, 3, generator=gen, dtype=torch.float64) * 2
    targets = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    mask = torch.rand(N, 1, generator=gen) < 0.7  # per example, broadcast over outputs
    if delta is None:
        per_item = F.mse_loss(predictions, targets, reduction="none")
        got = mse_loss(predictions, targets, mask=mask, reduction=reduction, num_items=num_items)
    else:
        per_item = F.huber_loss(predictions, targets, delta=delta, reduction="none")
        got = huber_loss(predictions, targets, delta=delta, mask=mask, reduction=reduction, num_items=num_items)
    torch.testing.assert_close(got, reduce_like(per_item, mask, reduction, num_items))


def test_hand_worked_numbers():
    # softmax([0, ln 3]) = (1/4, 3/4)
    two = torch.tensor([[0.0, math.log(3.0)]])
    one = torch.tensor([1])
    w = [2.0, 0.5]
    ce = classification_cross_entropy(two, one, class_weights=w, label_smoothing=0.2).item()
    assert ce == pytest.approx(
        0.8 * 0.5 * math.log(4 / 3) + 0.2 / 2 * (2 * math.log(4) + 0.5 * math.log(4 / 3)), rel=1e-6
    )
    assert ce == pytest.approx(0.115073 + 0.291643, abs=1e-6)
    assert focal_loss(two, one, gamma=2.0, alpha=[0.1, 0.9]).item() == pytest.approx(
        0.9 / 16 * math.log(4 / 3), rel=1e-6
    )
    # sigmoid(0) = 1/2: BCE = ln 2, times pos_weight for a positive; focal: a_t (1 - p_t)^2 ln 2
    zero, positive = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    assert binary_cross_entropy(zero, positive, pos_weight=3.0).item() == pytest.approx(3 * math.log(2), rel=1e-6)
    assert binary_focal_loss(zero, positive).item() == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-6)
    # scores (1, 0.5, 0), true class 0, margin 1: competitors give max(0, 0.5) and max(0, 0); / C = 3
    scores, first = torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([0])
    assert multiclass_hinge_loss(scores, first).item() == pytest.approx(0.5 / 3, rel=1e-6)
    assert multiclass_hinge_loss(scores, first, squared=True).item() == pytest.approx(0.25 / 3, rel=1e-6)
    # errors 2 and 0.5: MSE mean (4 + 0.25) / 2; Huber(delta 1): 1 * (2 - 0.5) = 1.5 and 0.5 * 0.25
    pred, target = torch.tensor([3.0, 1.5]), torch.tensor([1.0, 1.0])
    assert mse_loss(pred, target).item() == pytest.approx(2.125)
    assert huber_loss(pred, target, reduction="none").tolist() == pytest.approx([1.5, 0.125])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: focal_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), gamma=-1.0), "gamma must be >= 0"),
        (lambda: binary_focal_loss(torch.zeros(2), torch.zeros(2), alpha=1.5), "alpha must be >= 0.0 and <= 1.0"),
        (
            lambda: classification_cross_entropy(
                torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), class_weights=[1.0]
            ),
            "class_weights has 1 entries but there are 3 classes",
        ),
        (
            lambda: classification_cross_entropy(torch.zeros(2, 3), torch.zeros(2)),
            "integer class indices",
        ),  # float targets
        (lambda: huber_loss(torch.zeros(2), torch.zeros(2), delta=0.0), "delta must be > 0"),
        (lambda: mse_loss(torch.zeros(2), torch.zeros(3)), r"shapes must match: predictions \(2,\)"),
        (
            lambda: multiclass_hinge_loss(
                torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), reduction="mean_of_means"
            ),
            "reduction must be one of .*'mean_of_means'",
        ),
    ],
)
def test_rejects_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_focal_gamma_below_one_has_finite_gradients_at_certain_items():
    """gamma < 1 and p_t = 1 in float32 (logit margin 30): the gradient is ~0, not NaN."""
    logits = torch.tensor([[30.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 1])
    loss = focal_loss(logits, targets, gamma=0.5)
    (grad,) = torch.autograd.grad(loss, logits)
    exact = logits.detach().double().requires_grad_()  # float64: 1 - p_t = 2e-13 > 0
    log_p = torch.log_softmax(exact, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    want = ((1 - log_p.exp()).pow(0.5) * -log_p).mean()
    torch.testing.assert_close(loss.double(), want)
    torch.testing.assert_close(grad.double(), torch.autograd.grad(want, exact)[0])

    x = torch.tensor([[30.0, -30.0, 0.5]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 1.0]])
    loss = binary_focal_loss(x, y, gamma=0.5, alpha=None)
    (grad,) = torch.autograd.grad(loss, x)
    exact = x.detach().double().requires_grad_()  # torchvision's formula, in float64
    p = torch.sigmoid(exact)
    p_t = p * y + (1 - p) * (1 - y)
    want = ((1 - p_t).pow(0.5) * F.binary_cross_entropy_with_logits(exact, y.double(), reduction="none")).mean()
    torch.testing.assert_close(loss.double(), want)
    torch.testing.assert_close(grad.double(), torch.autograd.grad(want, exact)[0])


def poison(values: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """NaN (and one inf) wherever ``drop`` (values' shape or its leading dims) is True."""
    drop = drop.reshape(drop.shape + (1,) * (values.ndim - drop.ndim)).expand(values.shape)
    out = values.masked_fill(drop, float("nan"))
    out[tuple(drop.nonzero()[0])] = float("inf")
    return out


def class_reference(name, x, y, w):
    """Per-item plain PyTorch (float64), 0 where ignored; trained items' values only."""
    keep = y != -100
    safe = torch.where(keep, y, 0)
    if name == "cross_entropy":
        per_item = F.cross_entropy(x, safe, reduction="none")
    elif name == "focal":
        log_p = torch.log_softmax(x, dim=-1).gather(-1, safe[:, None]).squeeze(-1)
        per_item = (1 - log_p.exp()).square() * -log_p
    else:
        per_item = F.multi_margin_loss(x, safe, reduction="none")
    return torch.where(keep, per_item * w, 0.0)


@pytest.mark.parametrize(
    "name, fn",
    [("cross_entropy", classification_cross_entropy), ("focal", focal_loss), ("hinge", multiclass_hinge_loss)],
)
def test_nan_at_ignored_items_reaches_neither_loss_nor_gradients_class(gen, name, fn):
    logits, targets, weights = class_batch(gen)
    ignored = targets == -100
    x, w = poison(logits, ignored).requires_grad_(), poison(weights, ignored).requires_grad_()
    got = fn(x, targets, weights=w)
    got_grads = torch.autograd.grad(got, (x, w))
    clean = (logits.clone().requires_grad_(), weights.clone().requires_grad_())
    want = class_reference(name, clean[0], targets, clean[1]).sum() / (~ignored).sum()
    torch.testing.assert_close(got, want)
    for g, wg in zip(got_grads, torch.autograd.grad(want, clean)):
        torch.testing.assert_close(g, wg)
        assert (g[ignored] == 0).all()


def elementwise_reference(name, x, y):
    if name == "binary_cross_entropy":
        return F.binary_cross_entropy_with_logits(x, y, reduction="none")
    if name == "binary_focal":
        p = torch.sigmoid(x)
        p_t = p * y + (1 - p) * (1 - y)
        a_t = 0.25 * y + 0.75 * (1 - y)
        return a_t * (1 - p_t).square() * F.binary_cross_entropy_with_logits(x, y, reduction="none")
    if name == "mse":
        return F.mse_loss(x, y, reduction="none")
    return F.huber_loss(x, y, reduction="none")


@pytest.mark.parametrize(
    "name, fn",
    [
        ("binary_cross_entropy", binary_cross_entropy),
        ("binary_focal", binary_focal_loss),
        ("mse", mse_loss),
        ("huber", huber_loss),
    ],
)
@pytest.mark.parametrize("per_example_mask", [False, True])
def test_nan_in_masked_items_reaches_neither_loss_nor_gradients_elementwise(
    gen, reduce_like, name, fn, per_example_mask
):
    """docs/losses.md: a NaN in a padded item cannot leak; not into the gradients either."""
    logits, targets, mask, weights = label_batch(gen)
    mask[3] = False  # a whole example masked: its (per-example) weight may be NaN too
    if per_example_mask:
        mask = mask[:, 0]
    example_dropped = ~mask if per_example_mask else ~mask.any(dim=-1)
    inputs = [poison(logits, ~mask), poison(targets, ~mask), poison(weights, example_dropped)]
    inputs = [t.requires_grad_() for t in inputs]
    got = fn(*inputs[:2], mask=mask, weights=inputs[2])
    got_grads = torch.autograd.grad(got, inputs)
    clean = [t.clone().requires_grad_() for t in (logits, targets, weights)]
    per_item = elementwise_reference(name, *clean[:2]) * clean[2]
    want = reduce_like(per_item, mask[:, None] if per_example_mask else mask, "mean")
    torch.testing.assert_close(got, want)
    for g, wg in zip(got_grads, torch.autograd.grad(want, clean)):
        torch.testing.assert_close(g, wg)


def test_rejects_non_finite_options():
    z, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="gamma must be a finite number; got nan"):
        focal_loss(z, y, gamma=float("nan"))
    with pytest.raises(ValueError, match="gamma must be a finite number; got inf"):
        binary_focal_loss(z, z, gamma=float("inf"))
    with pytest.raises(ValueError, match="delta must be a finite number; got inf"):  # NaN gradients
        huber_loss(torch.zeros(2), torch.zeros(2), delta=float("inf"))
    with pytest.raises(ValueError, match="margin must be a finite number; got nan"):
        multiclass_hinge_loss(z, y, margin=float("nan"))
    with pytest.raises(ValueError, match="num_items must be a finite number >= 0; got -5"):
        mse_loss(torch.zeros(2), torch.zeros(2), num_items=-5)
