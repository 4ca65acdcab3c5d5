"""The fused loss head equals token_cross_entropy on the full logits, for every option.

Reference: ``token_cross_entropy(hidden @ weight.T + bias, labels, **same)`` with autograd
through the full logits. Also: the analytic per-row gradient, one hand-worked number, float64
gradcheck, ignored rows and empty masks, bfloat16, a frozen weight, accumulation invariance.
"""

from __future__ import annotations

import math

import pytest
import torch

from losslab.losses import fused as fused_module
from losslab.losses.fused import _Formula, _row_terms, default_chunk_size, fused_linear_cross_entropy
from losslab.losses.token import token_cross_entropy, token_loss_terms

# N = 300 tokens (chunk 256 leaves a partial chunk). V > N keeps every gradient entry a sum of
# few terms, so float32 rounding (of the reference too) stays below the 1e-6 tolerance.
B, T, D, V = 3, 100, 16, 509
OPTIONS = {
    "plain": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "focal": {"focal_gamma": 2.0},
    "focal_fractional": {"focal_gamma": 0.5},
    "z_loss": {"z_loss": 1e-2},
    "token_weights": {"token_weights": True},
    "everything": {"label_smoothing": 0.2, "focal_gamma": 1.5, "z_loss": 1e-3, "token_weights": True},
}
REDUCTIONS = ["mean", "sum", "none", "sequence"]
CHUNKS = [1, 7, 256, B * T]
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread is faster, and immune to other processes holding the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_case(
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    shape: tuple[int, ...] = (B, T),
    d: int = D,
    vocab: int = V,
    ignored: float = 0.3,
    bias: bool = True,
    weights: bool = False,
    seed: int = 0,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=gen, dtype=torch.float64) * 0.4
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignored] = -100
    case = {
        "hidden": hidden.to(dtype).to(device).requires_grad_(),
        "weight": weight.to(dtype).to(device).requires_grad_(),
        "labels": labels.to(device),
        "bias": (torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.5).to(dtype).to(device).requires_grad_()
        if bias
        else None,
        "token_weights": (torch.rand(shape, generator=gen, dtype=torch.float64) * 2)
        .to(dtype)
        .to(device)
        .requires_grad_()
        if weights
        else None,
    }
    return case


def options_for(name: str) -> tuple[dict, bool]:
    opts = dict(OPTIONS[name])
    return opts, bool(opts.pop("token_weights", False))


def reference(case: dict, chunk_size: int | None = None, **kwargs) -> torch.Tensor:
    logits = case["hidden"] @ case["weight"].T
    if case["bias"] is not None:
        logits = logits + case["bias"]
    return token_cross_entropy(logits, case["labels"], token_weights=case["token_weights"], **kwargs)


def fused(case: dict, **kwargs) -> torch.Tensor:
    return fused_linear_cross_entropy(
        case["hidden"], case["weight"], case["labels"], bias=case["bias"], token_weights=case["token_weights"], **kwargs
    )


def leaves(case: dict) -> list[torch.Tensor]:
    return [
        case[k] for k in ("hidden", "weight", "bias", "token_weights") if case[k] is not None and case[k].requires_grad
    ]


def loss_and_grads(fn, case: dict, upstream_seed: int = 7, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = fn(case, **kwargs)
    gen = torch.Generator().manual_seed(upstream_seed)
    upstream = (torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves(case), upstream, allow_unused=True)
    return out.detach(), [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves(case))]


def assert_same(case: dict, rtol: float = RTOL, atol: float = ATOL, **kwargs) -> None:
    got, got_grads = loss_and_grads(fused, case, **kwargs)
    want, want_grads = loss_and_grads(reference, case, **kwargs)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for name, g, w in zip(("hidden", "weight", "bias", "token_weights"), got_grads, want_grads):
        # atol relative to the tensor's largest entry once that is above 1: under reduction "none"
        # gradients reach ~10, and the float32 reference's own rounding error there (4e-6 against
        # float64, twice the fused head's; measured, the amount depends on the CPU's matmul
        # kernels) is above a fixed 1e-6
        scaled = atol * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=rtol, atol=scaled, msg=lambda m, name=name: f"grad {name}: {m}")


# --- equality with the reference ------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_equals_reference_float32(option: str, reduction: str, chunk_size: int) -> None:
    opts, weights = options_for(option)
    case = make_case(weights=weights, seed=REDUCTIONS.index(reduction))
    assert_same(case, reduction=reduction, chunk_size=chunk_size, **opts)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_equals_reference_float64(option: str, reduction: str) -> None:
    """In float64 the only difference is summation order: equal to 1e-10."""
    opts, weights = options_for(option)
    case = make_case(dtype=torch.float64, vocab=67, weights=weights, seed=REDUCTIONS.index(reduction))
    for chunk_size in (7, B * T):
        assert_same(case, rtol=1e-10, atol=1e-12, reduction=reduction, chunk_size=chunk_size, **opts)


@pytest.mark.parametrize("reduction", ["mean", "sequence"])
def test_num_items_overrides_the_denominator(reduction: str) -> None:
    case = make_case(weights=True)
    assert_same(case, reduction=reduction, num_items=37, label_smoothing=0.1, chunk_size=64)
    assert_same(case, reduction=reduction, num_items=torch.tensor(11.0), z_loss=1e-3, chunk_size=64)


def test_no_bias_and_flat_rows() -> None:
    case = make_case(shape=(50,), bias=False, weights=True)
    for reduction in REDUCTIONS:
        assert_same(case, reduction=reduction, focal_gamma=1.0, label_smoothing=0.05, chunk_size=8)


def test_tiles_smaller_than_the_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several vocabulary tiles per chunk (the online logsumexp across tiles), ragged last tile."""
    monkeypatch.setattr(fused_module, "CPU_TILE_BYTES", 2048)  # 8 rows x 300 x 4 B: 5 tiles of 64 columns
    assert fused_module._tile_size(8, 300, torch.float32, torch.device("cpu")) == 64
    case = make_case(vocab=300, weights=True)
    for reduction in ("mean", "none"):
        assert_same(case, reduction=reduction, chunk_size=8, label_smoothing=0.1, focal_gamma=2.0, z_loss=1e-3)


def test_extreme_logits_stay_finite() -> None:
    case = make_case(shape=(40,), d=8, vocab=50)
    with torch.no_grad():
        case["weight"].mul_(60.0)  # logits in the hundreds: exp would overflow without the max shift
    got, got_grads = loss_and_grads(fused, case, label_smoothing=0.1, focal_gamma=2.0, chunk_size=16)
    want, want_grads = loss_and_grads(reference, case, label_smoothing=0.1, focal_gamma=2.0)
    assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in got_grads)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", [{"dft": True}, {"dft": True, "z_loss": 1e-2, "token_weights": True}])
def test_dft_equals_reference(options: dict, reduction: str) -> None:
    """DFT (each token's CE times its detached p_y) through the fused head equals
    token_cross_entropy(dft=True), values and gradients, with z-loss and token weights."""
    opts = dict(options)
    weights = bool(opts.pop("token_weights", False))
    assert_same(make_case(weights=weights), chunk_size=7, reduction=reduction, **opts)


def test_dft_refuses_label_smoothing_and_focal() -> None:
    case = make_case()
    with pytest.raises(ValueError, match="dft does not compose with label_smoothing=0.1"):
        fused(case, dft=True, label_smoothing=0.1)


# --- the analytic gradient and the hand-worked number ----------------------------------------


@pytest.mark.parametrize(
    "formula",
    [
        _Formula(0.0, 0.0, 0.0),
        _Formula(0.3, 0.0, 0.0),
        _Formula(0.0, 0.0, 2.0),
        _Formula(0.0, 0.0, 0.7),
        _Formula(0.0, 0.05, 0.0),
        _Formula(0.2, 0.01, 1.5),
        _Formula(0.0, 0.0, 0.0, dft=True),
        _Formula(0.0, 0.05, 0.0, dft=True),
    ],
)
def test_row_gradient_is_the_derivative_of_token_loss_terms(formula: _Formula) -> None:
    """dl/dz = A p - C e_y - B (the coefficients from _row_terms) equals autograd of the formula."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(20, 11, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    targets = torch.randint(0, 11, (20,), generator=gen)
    loss = token_loss_terms(
        logits,
        targets,
        label_smoothing=formula.label_smoothing,
        z_loss=formula.z_loss,
        focal_gamma=formula.focal_gamma,
        dft=formula.dft,
    )
    (want,) = torch.autograd.grad(loss.sum(), logits)
    z = logits.detach()
    lse = torch.logsumexp(z, dim=1)
    got_loss, coef_p, coef_y, coef_c = _row_terms(
        lse, z.gather(1, targets[:, None]).squeeze(1), z.mean(dim=1), 11, formula
    )
    got = coef_p[:, None] * torch.softmax(z, dim=1)
    got[torch.arange(20), targets] -= coef_y
    if coef_c is not None:
        got -= coef_c[:, None]
    torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_hand_worked_number() -> None:
    """h = [1], W = [[2], [0], [0]], y = 0: logits (2, 0, 0), -log p_0 = log(1 + 2 e^-2)."""
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[2.0], [0.0], [0.0]], requires_grad=True)
    labels = torch.tensor([0])
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    assert loss.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)
    loss.backward()
    p0 = 1 / (1 + 2 * math.exp(-2))
    # dl/dz = p - e_0, dl/dh = sum_v dz_v W_v = (p0 - 1) * 2
    assert hidden.grad.item() == pytest.approx(2 * (p0 - 1), rel=1e-6)
    # with z-loss 0.1 and label smoothing 0.3 (mean_v -log p_v = lse - 2/3)
    lse = math.log(math.exp(2) + 2)
    want = 0.7 * (lse - 2) + 0.3 * (lse - 2 / 3) + 0.1 * lse**2
    got = fused_linear_cross_entropy(hidden, weight, labels, label_smoothing=0.3, z_loss=0.1)
    assert got.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none", "sequence"])
def test_gradcheck_float64(reduction: str) -> None:
    case = make_case(dtype=torch.float64, shape=(2, 5), d=3, vocab=7, ignored=0.3, weights=True, seed=5)

    def fn(hidden, weight, bias, token_weights):
        return fused_linear_cross_entropy(
            hidden,
            weight,
            case["labels"],
            bias=bias,
            token_weights=token_weights,
            reduction=reduction,
            chunk_size=3,
            label_smoothing=0.2,
            focal_gamma=1.5,
            z_loss=0.05,
        )

    assert torch.autograd.gradcheck(fn, (case["hidden"], case["weight"], case["bias"], case["token_weights"]))


# --- masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignored_rows_get_exactly_zero_gradient(reduction: str) -> None:
    case = make_case(ignored=0.5, weights=True)
    out = fused(case, reduction=reduction, label_smoothing=0.1, focal_gamma=2.0, z_loss=1e-3, chunk_size=7)
    out.sum().backward()
    ignored = case["labels"] == -100
    assert ignored.any()
    assert (case["hidden"].grad[ignored] == 0).all()
    assert (case["token_weights"].grad[ignored] == 0).all()
    assert (case["hidden"].grad[~ignored].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_mask_gives_zero_loss_and_gradient(reduction: str) -> None:
    case = make_case(ignored=1.0, weights=True)
    out = fused(case, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    assert (out == 0).all()
    out.sum().backward()
    for x in leaves(case):
        assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad == 0).all()


def test_works_without_autograd() -> None:
    """Evaluation loops call the loss under no_grad or inference_mode."""
    case = make_case(weights=True)
    want = {r: reference(case, reduction=r, num_items=50).detach() for r in REDUCTIONS}
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            for reduction in REDUCTIONS:
                got = fused(case, reduction=reduction, num_items=50, chunk_size=64)
                torch.testing.assert_close(got, want[reduction], rtol=RTOL, atol=ATOL)


def test_ignore_index_other_than_default() -> None:
    case = make_case(ignored=0.0)
    case["labels"][:, ::4] = 5  # treat class 5 as the ignore index
    assert_same(case, ignore_index=5, chunk_size=32)


# --- dtypes, frozen weight, shapes, accumulation ------------------------------------------------


def test_bfloat16_inputs_compute_in_float32() -> None:
    case = make_case(dtype=torch.bfloat16, weights=True)
    got, got_grads = loss_and_grads(fused, case, label_smoothing=0.1, z_loss=1e-3, chunk_size=64)
    assert got.dtype == torch.float32
    assert [g.dtype for g in got_grads] == [torch.bfloat16] * 4
    # against the reference on the same (bfloat16-valued) inputs upcast to float32
    up = {
        k: (v.detach().float().requires_grad_() if v is not None and v.is_floating_point() else v)
        for k, v in case.items()
    }
    want, want_grads = loss_and_grads(reference, up, label_smoothing=0.1, z_loss=1e-3)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    for g, w in zip(got_grads, want_grads):  # float32 gradients, rounded once to bfloat16
        torch.testing.assert_close(g, w.to(torch.bfloat16))


def test_frozen_weight_does_no_weight_gradient_work() -> None:
    case = make_case(weights=True)
    case["weight"].requires_grad_(False)
    case["bias"].requires_grad_(False)
    assert_same(case, label_smoothing=0.1, focal_gamma=2.0, chunk_size=64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused(case, label_smoothing=0.1, chunk_size=64).backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::addmm_" not in ops  # the weight-gradient matmul
    assert case["weight"].grad is None
    case["weight"].requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused(case, chunk_size=64).backward()
    assert "aten::addmm_" in {e.key for e in prof.key_averages()}


def test_reduction_none_recomputes_in_backward() -> None:
    """Per-token upstream gradients: forward computes losses only, backward the gradients."""
    case = make_case(weights=True)
    assert_same(case, reduction="none", focal_gamma=2.0, chunk_size=33)
    out = fused(case, reduction="none", chunk_size=33)
    assert out.shape == case["labels"].shape


def test_scalar_upstream_gradient_scales_the_stored_gradients() -> None:
    case = make_case()
    (3.0 * fused(case, chunk_size=50)).backward()
    got = [x.grad.clone() for x in leaves(case)]
    for x in leaves(case):
        x.grad = None
    (3.0 * reference(case)).backward()
    for g, x in zip(got, leaves(case)):
        torch.testing.assert_close(g, x.grad, rtol=RTOL, atol=ATOL)


def test_backward_twice_through_a_retained_graph() -> None:
    case = make_case()
    out = fused(case, label_smoothing=0.1)
    out.backward(retain_graph=True)
    first = [x.grad.clone() for x in leaves(case)]
    out.backward()  # recomputed: the forward's gradients were handed over the first time
    for g, x in zip(first, leaves(case)):
        torch.testing.assert_close(x.grad, 2 * g)


def test_accumulation_split_invariance() -> None:
    """8 micro-batches with num_items = the global count == one batch (the trl invariant)."""
    case = make_case(shape=(8, 40), weights=True)
    whole = fused(case, chunk_size=64, label_smoothing=0.1)
    total = int((case["labels"] != -100).sum())
    parts = sum(
        fused_linear_cross_entropy(
            case["hidden"][i],
            case["weight"],
            case["labels"][i],
            bias=case["bias"],
            token_weights=case["token_weights"][i],
            num_items=total,
            label_smoothing=0.1,
        )
        for i in range(8)
    )
    torch.testing.assert_close(parts, whole, rtol=RTOL, atol=ATOL)


def test_default_chunk_size() -> None:
    assert default_chunk_size(4096, 49152, 576, torch.float32) == 512
    assert default_chunk_size(4096, 151936, 576, torch.float32) == 512
    assert default_chunk_size(100, 49152, 576, torch.float32) == 100
    # chunk logits capped at max(64 MiB, V * d * 4 bytes): rows <= d once V * d * 4 > 64 MiB
    assert default_chunk_size(4096, 1_000_000, 64, torch.float32) == 64
    assert default_chunk_size(4096, 1_000_000, 8, torch.float32) == 64 * 2**20 // (4 * 1_000_000)


def test_bad_inputs_are_rejected() -> None:
    case = make_case()
    with pytest.raises(ValueError, match="align"):
        fused_linear_cross_entropy(case["hidden"], case["weight"], case["labels"][:, :5])
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_cross_entropy(case["hidden"], case["weight"], torch.full(case["labels"].shape, V))
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(case["hidden"], case["weight"], case["labels"], reduction="max")
    with pytest.raises(ValueError, match="bias"):
        fused_linear_cross_entropy(case["hidden"], case["weight"], case["labels"], bias=torch.zeros(V + 1))


def test_rejects_non_finite_options_and_negative_counts() -> None:
    case = make_case()
    for kwargs, message in (
        ({"z_loss": math.nan}, "z_loss must be >= 0 and finite; got nan"),
        ({"focal_gamma": math.nan}, "focal_gamma must be >= 0 and finite; got nan"),
        ({"num_items": -5}, "num_items must be a finite number >= 0; got -5"),
        ({"num_items": -5, "reduction": "sequence"}, "num_items must be a finite number >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            fused(case, **kwargs)


# --- autocast, -inf logits, evaluation ---------------------------------------------------------


def confident_case(dtype: torch.dtype, device: str = "cpu") -> dict:
    """Target logits from about 1 to 60 (p_y up to 1 in float32), no bias."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 64, generator=gen) / 8
    labels = torch.randint(0, 1000, (32,), generator=gen)
    hidden = weight[labels] * torch.linspace(1, 60, 32)[:, None] + 0.1 * torch.randn(32, 64, generator=gen)
    return {
        "hidden": hidden.to(device=device, dtype=dtype).requires_grad_(),
        "weight": weight.to(device=device, dtype=dtype).requires_grad_(),
        "labels": labels.to(device),
        "bias": None,
        "token_weights": None,
    }


def float64_reference(case: dict, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Plain PyTorch in float64 on the same values: F.cross_entropy of hidden @ weight.T."""
    exact = {k: v.detach().double().requires_grad_() if k in ("hidden", "weight") else v for k, v in case.items()}
    logits = exact["hidden"] @ exact["weight"].T
    return loss_and_grads(lambda c, **kw: torch.nn.functional.cross_entropy(logits, c["labels"], **kw), exact, **kwargs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_does_not_lower_the_heads_precision(dtype: torch.dtype, reduction: str, device: str) -> None:
    """Under CPU bfloat16 autocast the head once ran z_y and the gradient matmuls in 16 bits
    against a float32 lse: per-token losses of -0.24..+0.26 where the reference is ~0.
    It computes in float32 whatever the autocast state, forward and backward (on CUDA too,
    where a Trainer with bf16 on runs the loss under autocast)."""
    case = confident_case(dtype, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        got, got_grads = loss_and_grads(fused, case, reduction=reduction)
    want, want_grads = float64_reference(case, reduction=reduction)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=5e-5)  # float32 rounding of logits ~60
    for g, w in zip(got_grads, want_grads):
        if dtype == torch.float32:
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=5e-5)
        else:  # float32 gradients rounded once to bfloat16
            torch.testing.assert_close(g, w.to(dtype))


def test_per_token_loss_is_never_negative() -> None:
    """z_y is not read from the logits that gave lse: for p_y = 1 in float32, lse - z_y could
    round to -1e-5; the reference never goes below 0."""
    got = fused(confident_case(torch.float32), reduction="none")
    assert (got >= 0).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_vocabulary_tile_of_minus_inf_logits(monkeypatch: pytest.MonkeyPatch, reduction: str) -> None:
    """A padded vocabulary masked by a -inf bias: a tile whose logits are all -inf has max
    -inf, and z - max would be NaN; it is shifted by 0 (as torch.logsumexp does)."""
    monkeypatch.setattr(fused_module, "CPU_TILE_BYTES", 2048)  # 8 rows x 300 x 4 B: 5 tiles of 64 columns
    case = make_case(shape=(40,), vocab=300, weights=True)
    with torch.no_grad():
        case["bias"][100:] = -math.inf  # tiles 2 to 4 entirely, tile 1 in part
    case["labels"] = torch.where(case["labels"] == -100, -100, case["labels"] % 100)
    got, got_grads = loss_and_grads(fused, case, reduction=reduction, chunk_size=8, focal_gamma=0.5)
    exact = {
        k: v.detach().double().requires_grad_() if v is not None and v.is_floating_point() else v
        for k, v in case.items()
    }

    def plain(c: dict, **_) -> torch.Tensor:  # float64 PyTorch: (1 - p_y)^0.5 * CE, times the weights
        log_p = torch.log_softmax(c["hidden"] @ c["weight"].T + c["bias"], dim=-1)
        trained = c["labels"] != -100
        log_p_y = log_p.gather(-1, torch.where(trained, c["labels"], 0)[:, None]).squeeze(-1)
        per_token = torch.where(trained, (1 - log_p_y.exp()).sqrt() * -log_p_y * c["token_weights"], 0.0)
        return per_token if reduction == "none" else per_token.sum() / trained.sum()

    want, want_grads = loss_and_grads(plain, exact)
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=ATOL)
    for g, w in zip(got_grads, want_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, rtol=RTOL, atol=ATOL)


def test_without_a_graph_only_losses_are_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation (no_grad, inference_mode, or nothing requiring grad): the scalar reductions
    once computed every gradient in forward (1.8x the time, a V x d buffer) for nothing."""
    gradients_wanted = []
    head_pass = fused_module._head_pass

    def spy(*args, **kwargs):
        gradients_wanted.append(args[4] is not None)  # row_scale: the gradients of sum(row_scale * loss)
        return head_pass(*args, **kwargs)

    monkeypatch.setattr(fused_module, "_head_pass", spy)
    case = make_case(weights=True)
    detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    for reduction in REDUCTIONS:
        want = fused(case, reduction=reduction, chunk_size=64, label_smoothing=0.1)
        assert gradients_wanted == [reduction != "none"]
        gradients_wanted.clear()
        for context, inputs in ((torch.no_grad, case), (torch.inference_mode, case), (torch.enable_grad, detached)):
            with context():
                got = fused(inputs, reduction=reduction, chunk_size=64, label_smoothing=0.1)
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)  # the same arithmetic
        assert gradients_wanted == [False, False, False]
        gradients_wanted.clear()


# --- CUDA: the same checks on a GPU --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_equals_reference_cuda(option: str, reduction: str) -> None:
    opts, weights = options_for(option)
    case = make_case(device="cuda", weights=weights)
    for chunk_size in CHUNKS:
        assert_same(case, reduction=reduction, chunk_size=chunk_size, **opts)


@pytest.mark.gpu
def test_cuda_masks_and_bfloat16() -> None:
    case = make_case(device="cuda", ignored=1.0)
    out = fused(case, label_smoothing=0.1)
    out.backward()
    assert out.item() == 0 and (case["hidden"].grad == 0).all() and (case["weight"].grad == 0).all()
    case = make_case(device="cuda", dtype=torch.bfloat16)
    out = fused(case, focal_gamma=2.0)
    out.backward()
    assert out.dtype == torch.float32 and case["weight"].grad.dtype == torch.bfloat16
    assert torch.isfinite(case["hidden"].grad.float()).all()


# --- the benchmark behind `losslab bench loss-head` ----------------------------------------------


def test_bench_case_runs_every_method_in_process() -> None:
    from losslab.losses.bench import run_case

    spec = {
        "tokens": 64,
        "hidden": 16,
        "vocab": 128,
        "ignored_fraction": 0.5,
        "repeats": 1,
        "warmup": 0,
        "device": "cpu",
        "dtype": "float32",
    }
    for method in ("plain", "torch_chunked", "losslab"):
        for option in ("plain", "focal", "token_weights"):
            result = run_case({**spec, "method": method, "option": option})
            if method == "torch_chunked" and option == "focal":
                assert result["supported"] is False
                continue
            assert result["supported"] and result["time_s"] > 0 and result["peak_mb"] >= 0


def test_bench_ratios_and_acceptance_checks() -> None:
    from losslab.losses.bench import compare, format_markdown, format_table

    def row(method, option, frac, t, mb):
        return {
            "method": method,
            "option": option,
            "ignored_fraction": frac,
            "supported": True,
            "time_s": t,
            "cpu_s": t,
            "peak_mb": mb,
        }

    results = [
        row("plain", "plain", 0.0, 10.0, 2000.0),
        row("torch_chunked", "plain", 0.0, 20.0, 300.0),
        row("losslab", "plain", 0.0, 5.0, 250.0),
        row("losslab", "plain", 0.5, 2.5, 240.0),
        row("plain", "plain", 0.5, 8.0, 2000.0),
        row("plain", "focal", 0.0, 12.0, 3000.0),
        row("losslab", "focal", 0.0, 6.0, 250.0),
        {"method": "torch_chunked", "option": "focal", "ignored_fraction": 0.0, "supported": False},
    ]
    rows, checks = compare(results)
    ours = next(r for r in rows if (r["method"], r["option"], r["ignored_fraction"]) == ("losslab", "plain", 0.0))
    assert ours["time_vs_plain"] == 0.5 and ours["memory_vs_plain"] == 0.125
    assert ours["time_vs_torch_chunked"] == 0.25 and ours["memory_vs_torch_chunked"] == pytest.approx(250 / 300)
    got = {(c["target"], c["where"]): (round(c["value"], 3), c["met"]) for c in checks}
    assert got[("time_vs_plain", "plain, ignored 0")] == (0.5, True)
    assert got[("half_ignored_vs_all_valid", "plain, ignored 0.5 vs 0")] == (0.5, True)
    assert got[("option_time_cost", "focal vs plain, ignored 0")] == (1.2, False)
    report = {
        "config": {
            "tokens": 1,
            "hidden": 1,
            "vocab": 1,
            "dtype": "float32",
            "device": "cpu",
            "threads": 1,
            "repeats": 1,
            "warmup": 0,
        },
        "results": rows,
        "acceptance": checks,
    }
    assert "n/a" in format_table(report) and "MISS" in format_table(report)
    assert "| focal | 0 | 12.00 s, 3,000 MB | n/a | 6.00 s, 250 MB | 0.50 / 0.08 | - |" in format_markdown(report)


@pytest.mark.slow
def test_bench_cli_runs_each_case_in_a_subprocess() -> None:
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "losslab.cli",
            "bench",
            "loss-head",
            "--tokens",
            "64",
            "--hidden",
            "16",
            "--vocab",
            "256",
            "--ignored-fraction",
            "0.5",
            "--repeats",
            "1",
            "--options",
            "plain",
            "z_loss",
            "--json",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["results"]) == 2 * 2 * 3  # fractions x options x methods
    assert any(c["target"] == "half_ignored_vs_all_valid" for c in report["acceptance"])
