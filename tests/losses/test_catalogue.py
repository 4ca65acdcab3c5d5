"""Properties every catalogue loss shares, checked on one table of cases:
float64 gradcheck, exactly zero loss and finite zero gradients when everything is masked or
ignored, and float32 / bfloat16 inputs (computed in float32, equal to float64 on the same values).
(Reference equality and hand-worked numbers live in the per-module test files.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from losslab.losses import (
    binary_cross_entropy,
    binary_focal_loss,
    bradley_terry_loss,
    classification_cross_entropy,
    consistency_loss,
    focal_loss,
    huber_loss,
    info_nce_loss,
    margin_ranking_loss,
    mse_loss,
    multiclass_hinge_loss,
    semantic_alignment_loss,
    semantic_l2_loss,
    triplet_loss,
)

N, C, D = 5, 4, 3
Case = Callable[[torch.Generator, torch.dtype, bool], tuple[tuple[torch.Tensor, ...], Callable[..., torch.Tensor]]]


def rand(gen, dtype, *shape):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 1.5).to(dtype)


def class_case(fn, **options) -> Case:
    def make(gen, dtype, empty):
        logits = rand(gen, dtype, N, C)
        targets = torch.randint(0, C, (N,), generator=gen)
        targets[1] = -100
        if empty:
            targets[:] = -100
        return (logits,), lambda x, reduction="mean": fn(x, targets, reduction=reduction, **options)

    return make


def elementwise_case(fn, binary_targets: bool, **options) -> Case:
    def make(gen, dtype, empty):
        x = rand(gen, dtype, N, C)
        y = (torch.rand(N, C, generator=gen) < 0.5).to(dtype) if binary_targets else rand(gen, dtype, N, C)
        mask = torch.rand(N, C, generator=gen) < 0.7
        if empty:
            mask[:] = False
        return (x,), lambda x, reduction="mean": fn(x, y, mask=mask, reduction=reduction, **options)

    return make


def pair_case(fn, **options) -> Case:
    def make(gen, dtype, empty):
        chosen, rejected = rand(gen, dtype, N), rand(gen, dtype, N)
        mask = torch.tensor([True, False, True, True, False]) & (not empty)
        return (chosen, rejected), lambda c, r, reduction="mean": fn(c, r, mask=mask, reduction=reduction, **options)

    return make


def embedding_case(fn, three: bool, **options) -> Case:
    def make(gen, dtype, empty):
        tensors = tuple(rand(gen, dtype, N, D) for _ in range(3 if three else 2))
        mask = torch.tensor([True, False, True, True, True]) & (not empty)
        return tensors, lambda *t, reduction="mean": fn(*t, mask=mask, reduction=reduction, **options)

    return make


def info_nce_with_negatives(q, k, n, **kwargs):
    return info_nce_loss(q, k, negatives=n, **kwargs)


def sequence_case(fn, with_response: bool = False, **options) -> Case:
    """(B, T, F) logits or features; masks: the trained positions, or (context, response)."""

    def make(gen, dtype, empty):
        x = rand(gen, dtype, 2, 6, C)
        trained = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 1]], dtype=torch.bool) & (not empty)
        masks = [~trained & (not empty), trained] if with_response else [trained]
        return (x,), lambda x, reduction="mean": fn(x, *masks, reduction=reduction, **options)

    return make


CASES: dict[str, Case] = {
    "cross_entropy": class_case(classification_cross_entropy, class_weights=[2.0, 0.5, 1.0, 3.0], label_smoothing=0.1),
    "focal": class_case(focal_loss, gamma=2.0, alpha=[0.1, 0.2, 0.3, 0.4], label_smoothing=0.1),
    "focal_fractional_gamma": class_case(focal_loss, gamma=0.5),
    "hinge": class_case(multiclass_hinge_loss, margin=1.0),
    "hinge_squared": class_case(multiclass_hinge_loss, squared=True, class_weights=[1.0, 2.0, 0.5, 1.0]),
    "binary_cross_entropy": elementwise_case(
        binary_cross_entropy, True, pos_weight=[1.0, 2.0, 0.5, 3.0], label_smoothing=0.1
    ),
    "binary_focal": elementwise_case(binary_focal_loss, True, gamma=2.0, alpha=0.25),
    "mse": elementwise_case(mse_loss, False),
    "huber": elementwise_case(huber_loss, False, delta=0.7),
    "bradley_terry": pair_case(bradley_terry_loss, margin=0.3, center_rewards_coefficient=0.01),
    "margin_ranking": pair_case(margin_ranking_loss, margin=0.5),
    **{
        f"triplet_{d}": embedding_case(triplet_loss, True, distance=d, swap=True)
        for d in ("euclidean", "squared_euclidean", "cosine", "manhattan")
    },
    "info_nce": embedding_case(info_nce_loss, False, temperature=0.5),
    "info_nce_symmetric_negatives": embedding_case(info_nce_with_negatives, True, temperature=0.5, symmetric=True),
    **{f"consistency_{d}": sequence_case(consistency_loss, divergence=d) for d in ("js", "kl", "l1")},
    "semantic_l2": sequence_case(semantic_l2_loss),
    "semantic_alignment": sequence_case(semantic_alignment_loss, with_response=True),
}


def build(case: str, dtype: torch.dtype, empty: bool = False, seed: int = 0):
    tensors, fn = CASES[case](torch.Generator().manual_seed(seed), dtype, empty)
    return tuple(t.detach().requires_grad_() for t in tensors), fn


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(case):
    inputs, fn = build(case, torch.float64)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_everything_masked_gives_zero_loss_and_zero_finite_gradients(case, reduction):
    inputs, fn = build(case, torch.float32, empty=True)
    loss = fn(*inputs, reduction=reduction)
    loss.backward()
    assert loss.item() == 0.0
    for t in inputs:
        assert t.grad is not None and torch.isfinite(t.grad).all() and (t.grad == 0).all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_and_bfloat16_inputs(case, dtype):
    inputs, fn = build(case, dtype)
    loss = fn(*inputs)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for t in inputs:
        assert t.grad.dtype == dtype and torch.isfinite(t.grad).all()
    same_values = tuple(t.detach().double() for t in inputs)
    torch.testing.assert_close(loss.double(), fn(*same_values), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_none_reduction_keeps_one_value_per_item_and_sums_to_sum(case):
    inputs, fn = build(case, torch.float64)
    per_item = fn(*inputs, reduction="none")
    assert per_item.ndim >= 1
    torch.testing.assert_close(per_item.sum(), fn(*inputs, reduction="sum"))


def test_every_case_uses_a_distinct_function_or_option():
    # guard against a copy-paste table: the cases must not all compute the same thing
    values = {}
    for name in CASES:
        inputs, fn = build(name, torch.float64)
        values[name] = round(fn(*inputs).item(), 9)
    assert len(set(values.values())) == len(values)
