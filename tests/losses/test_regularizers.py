"""L2 and L2-SP on a chosen parameter subset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from losslab.losses import l2_penalty, l2_sp_penalty, select_parameters, snapshot_parameters


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(dtype)
    model[2].bias.requires_grad_(False)  # a frozen tensor
    return model


def brute_half_square(tensors):
    return 0.5 * sum(float(x) ** 2 for t in tensors for x in t.detach().reshape(-1).tolist())


@pytest.mark.parametrize(
    "include, exclude, trainable_only, expected",
    [
        (("*",), (), True, ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight"]),
        (("*",), (), False, ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]),
        (("*",), ("*bias", "1.*"), True, ["0.weight", "2.weight"]),
        (("2.*",), (), True, ["2.weight"]),
    ],
)
def test_select_parameters(include, exclude, trainable_only, expected):
    chosen = select_parameters(tiny_model(), include=include, exclude=exclude, trainable_only=trainable_only)
    assert list(chosen) == expected


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("exclude", [(), ("*bias", "1.*")])
def test_l2_matches_brute_force(reduction, exclude):
    model = tiny_model()
    chosen = [
        p
        for n, p in model.named_parameters()
        if p.requires_grad and not (exclude and ("bias" in n or n.startswith("1.")))
    ]
    got = l2_penalty(model, exclude=exclude, reduction=reduction)
    if reduction == "none":
        assert got.tolist() == pytest.approx([brute_half_square([p]) for p in chosen])
    else:
        total = brute_half_square(chosen)
        expected = total if reduction == "sum" else total / sum(p.numel() for p in chosen)
        assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_l2_sp_matches_brute_force(reduction):
    model, pretrained = tiny_model(0), tiny_model(1)
    reference = snapshot_parameters(pretrained, exclude=["*bias"])
    got = l2_sp_penalty(model, reference, exclude=["*bias"], reduction=reduction)
    diffs = [p - reference[n] for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    if reduction == "none":
        assert got.tolist() == pytest.approx([brute_half_square([d]) for d in diffs])
    else:
        total = brute_half_square(diffs)
        assert got.item() == pytest.approx(total if reduction == "sum" else total / sum(d.numel() for d in diffs))


def test_gradients_are_the_weight_decay_steps():
    model, pretrained = tiny_model(0), tiny_model(1)
    reference = snapshot_parameters(pretrained)
    (l2_penalty(model) + 2.0 * l2_sp_penalty(model, reference)).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, p.detach() + 2.0 * (p.detach() - reference[name]))
        else:
            assert p.grad is None


def test_hand_worked_numbers():
    params = {"w": torch.tensor([3.0, 4.0], requires_grad=True), "b": torch.tensor([1.0], requires_grad=True)}
    assert l2_penalty(params).item() == pytest.approx(0.5 * (9 + 16 + 1))
    assert l2_penalty(params, exclude=["b"], reduction="mean").item() == pytest.approx(0.5 * 25 / 2)
    reference = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([1.0])}
    assert l2_sp_penalty(params, reference).item() == pytest.approx(0.5 * (4 + 9 + 0))


def test_gradcheck_float64():
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    ref = {"w": torch.randn(3, 2, dtype=torch.float64)}
    assert torch.autograd.gradcheck(lambda w: l2_penalty({"w": w}, reduction="mean"), (w,))
    assert torch.autograd.gradcheck(lambda w: l2_sp_penalty({"w": w}, ref), (w,))


def test_zero_at_the_reference_with_zero_finite_gradients():
    model = tiny_model(dtype=torch.float32)
    loss = l2_sp_penalty(model, snapshot_parameters(model))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() and (p.grad == 0).all() for p in model.parameters() if p.requires_grad)
    zeros = {"w": torch.zeros(4, requires_grad=True)}
    l2_penalty(zeros).backward()
    assert (zeros["w"].grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_and_bfloat16_parameters(dtype):
    model = tiny_model(dtype=dtype)
    reference = snapshot_parameters(tiny_model(1, dtype=dtype))
    loss = l2_penalty(model) + l2_sp_penalty(model, reference)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    as_double = {n: p.detach().double().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    ref_double = {n: r.double() for n, r in reference.items()}
    expected = l2_penalty(as_double) + l2_sp_penalty(as_double, ref_double)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)


def test_errors_name_the_problem():
    model = tiny_model()
    with pytest.raises(ValueError, match="select no trainable parameter; names look like: 0.weight"):
        l2_penalty(model, include=["encoder.*"])
    with pytest.raises(ValueError, match="no reference weights for 1 parameter"):
        l2_sp_penalty(model, {n: p for n, p in snapshot_parameters(model).items() if n != "0.bias"})
    bad = snapshot_parameters(model)
    bad["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="reference 0.weight has shape"):
        l2_sp_penalty(model, bad)
    with pytest.raises(TypeError, match="lists of patterns"):
        l2_penalty(model, exclude="*bias")
