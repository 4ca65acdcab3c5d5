"""Per-segment completion log-probs: the plain and the fused function against a float64 reference.

Reference: ``log_softmax`` (float64), ``gather``, ``index_add`` per segment, written out here.
Also: float64 gradcheck of both, fused == plain (values and gradients, float32 and float64,
chunk sizes 1 / odd / all rows), empty segments, 16-bit inputs and autocast, long completions.
"""

from __future__ import annotations

import pytest
import torch

from losslab.losses.logprobs import fused_sequence_logps, sequence_logps

M, D, V, S = 37, 12, 211, 5  # 37 scored positions, 5 segments (segment 3 left empty)
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_case(dtype: torch.dtype = torch.float64, *, m: int = M, seed: int = 0, bias: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=gen, dtype=torch.float64) * 0.1 if bias else None
    targets = torch.randint(0, V, (m,), generator=gen)
    segments = torch.randint(-1, S, (m,), generator=gen)
    segments[segments == 3] = 4  # an empty segment
    targets[segments == -1] = -100  # not counted: never read
    return {
        "hidden": hidden.to(dtype),
        "weight": weight.to(dtype),
        "bias": b.to(dtype) if b is not None else None,
        "targets": targets,
        "segments": segments,
    }


def reference(logits: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor, num_segments: int):
    """Float64, written out: log_softmax, gather at the counted positions, index_add per segment."""
    keep = segments >= 0
    logp = torch.log_softmax(logits[keep].double(), dim=-1).gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    sums = torch.zeros(num_segments, dtype=torch.float64).index_add(0, segments[keep], logp)
    counts = torch.zeros(num_segments, dtype=torch.long).index_add(0, segments[keep], torch.ones_like(segments[keep]))
    return sums, counts


def logits_of(case: dict) -> torch.Tensor:
    z = case["hidden"] @ case["weight"].T
    return z + case["bias"] if case["bias"] is not None else z


def test_plain_equals_float64_reference():
    case = make_case(torch.float32)
    sums, counts = sequence_logps(logits_of(case), case["targets"], case["segments"], S)
    ref_sums, ref_counts = reference(logits_of(make_case()), case["targets"], case["segments"], S)
    assert sums.dtype == torch.float32 and counts.dtype == torch.long
    torch.testing.assert_close(sums.double(), ref_sums, rtol=RTOL, atol=1e-5)
    assert torch.equal(counts, ref_counts)
    assert counts[3] == 0 and sums[3] == 0


def test_hand_worked_number():
    # two tokens of segment 0 (uniform over 4 then a sure target), one of segment 1, one not counted
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 50.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]])
    targets = torch.tensor([2, 1, 3, 0])
    segments = torch.tensor([0, 0, 1, -1])
    sums, counts = sequence_logps(logits.double(), targets, segments, 2)
    lse = torch.log(torch.exp(torch.tensor([1.0, 2, 3, 4], dtype=torch.float64)).sum())
    expected = torch.tensor([-torch.log(torch.tensor(4.0, dtype=torch.float64)) + 0.0, 4.0 - lse])
    torch.testing.assert_close(sums, expected, rtol=0, atol=1e-12)
    assert counts.tolist() == [2, 1]


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_gradcheck_float64(fused: bool):
    case = make_case(m=9)
    targets, segments = case["targets"], case["segments"]
    weights = torch.randn(S, dtype=torch.float64)  # a non-uniform upstream gradient per segment

    if fused:
        inputs = tuple(case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))

        def fn(h, w, b):
            return (fused_sequence_logps(h, w, targets, segments, S, bias=b, chunk_size=4)[0] * weights).sum()
    else:
        inputs = (logits_of(case).clone().requires_grad_(),)

        def fn(z):
            return (sequence_logps(z, targets, segments, S)[0] * weights).sum()

    assert torch.autograd.gradcheck(fn, inputs)


def grads_of(fn, tensors: list[torch.Tensor], weights: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.clone().requires_grad_() for t in tensors]
    sums, _ = fn(*leaves)
    (sums * weights).sum().backward()
    return sums.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 7, None, 1000])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_fused_equals_plain(dtype: torch.dtype, chunk_size: int | None, bias: bool):
    case = make_case(dtype, bias=bias)
    targets, segments = case["targets"], case["segments"]
    weights = torch.randn(S, dtype=dtype, generator=torch.Generator().manual_seed(5))
    tensors = [case["hidden"], case["weight"]] + ([case["bias"]] if bias else [])

    def plain(h, w, b=None):
        z = h @ w.T
        return sequence_logps(z + b if b is not None else z, targets, segments, S)

    def fused(h, w, b=None):
        return fused_sequence_logps(h, w, targets, segments, S, bias=b, chunk_size=chunk_size)

    want, want_grads = grads_of(plain, tensors, weights)
    got, got_grads = grads_of(fused, tensors, weights)
    tol = {"rtol": RTOL, "atol": ATOL} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, **tol)
    # positions not counted get exactly zero gradient
    assert got_grads[0][segments < 0].abs().max() == 0
    assert torch.equal(fused(*tensors)[1], plain(*tensors)[1])


def test_fused_matches_reference_float64():
    case = make_case()
    sums, counts = fused_sequence_logps(
        case["hidden"], case["weight"], case["targets"], case["segments"], S, bias=case["bias"]
    )
    ref_sums, ref_counts = reference(logits_of(case), case["targets"], case["segments"], S)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=1e-12)
    assert torch.equal(counts, ref_counts)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_empty_segments_and_no_counted_position(fused: bool):
    case = make_case(torch.float32)
    segments = torch.full((M,), -1)
    h = case["hidden"].clone().requires_grad_()
    if fused:
        sums, counts = fused_sequence_logps(h, case["weight"], case["targets"], segments, 3)
    else:
        sums, counts = sequence_logps(h @ case["weight"].T, case["targets"], segments, 3)
    assert sums.tolist() == [0.0, 0.0, 0.0] and counts.tolist() == [0, 0, 0]
    (sums / counts.clamp(min=1)).sum().backward()  # a length-normalised loss on empty segments
    assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().max() == 0
    # zero segments at all
    empty = sequence_logps(torch.zeros(0, V), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0)
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_sum_in_float32(dtype: torch.dtype):
    case = make_case(torch.float32)
    h, w = case["hidden"].to(dtype), case["weight"].to(dtype)
    ref, _ = reference(h.double() @ w.double().T, case["targets"], case["segments"], S)
    fused, _ = fused_sequence_logps(h, w, case["targets"], case["segments"], S)
    plain, _ = sequence_logps((h.float() @ w.float().T).to(dtype), case["targets"], case["segments"], S)
    assert fused.dtype == torch.float32 and plain.dtype == torch.float32
    torch.testing.assert_close(fused.double(), ref, rtol=1e-5, atol=1e-4)
    # the plain one is given 16-bit logits: each is off by half an ulp of its value at most
    torch.testing.assert_close(plain.double(), ref, rtol=2e-2, atol=0.5)


def test_bf16_autocast_accumulates_in_float32():
    case = make_case(torch.float32, bias=False)
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = h @ w.T  # bf16 under autocast
        assert logits.dtype == torch.bfloat16
        plain, _ = sequence_logps(logits, case["targets"], case["segments"], S)
        fused, _ = fused_sequence_logps(h, w, case["targets"], case["segments"], S)
    assert plain.dtype == torch.float32 and fused.dtype == torch.float32
    ref, _ = reference(logits_of(make_case(bias=False)), case["targets"], case["segments"], S)
    torch.testing.assert_close(fused.double(), ref, rtol=1e-5, atol=1e-5)  # the head turns autocast off
    fused.sum().backward()
    assert h.grad is not None and h.grad.dtype == torch.float32 and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_long_completions_stay_finite(dtype: torch.dtype, fused: bool):
    """4,000 tokens of about -20 nats each: -80,000 overflows float16 (max 65,504), and bfloat16
    keeps 3 significant digits; the sums accumulate in float32."""
    n, vocab, d = 4000, 64, 8
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(n, d, generator=gen) * 3
    weight = torch.randn(vocab, d, generator=gen) * 3
    targets = (hidden @ weight.T).argmin(dim=1)  # the least likely token: large negative log-probs
    segments = torch.zeros(n, dtype=torch.long)
    segments[n // 2 :] = 1
    h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    if fused:
        sums, counts = fused_sequence_logps(h, w, targets, segments, 2, chunk_size=512)
    else:
        sums, counts = sequence_logps(h @ w.T, targets, segments, 2)
    ref, _ = reference(h.detach().double() @ w.detach().double().T, targets, segments, 2)
    assert ref.sum() < -65504  # would overflow float16
    assert sums.dtype == torch.float32 and torch.isfinite(sums).all() and counts.tolist() == [2000, 2000]
    tol = 1e-5 if fused else 1e-2  # plain: the logits themselves were rounded to 16 bits
    torch.testing.assert_close(sums.double(), ref, rtol=tol, atol=0.0)
    (sums[0] - sums[1]).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_no_grad_and_frozen_weight():
    case = make_case(torch.float32)
    with torch.no_grad():
        sums, _ = fused_sequence_logps(case["hidden"], case["weight"], case["targets"], case["segments"], S)
    assert not sums.requires_grad
    h = case["hidden"].clone().requires_grad_()
    sums, _ = fused_sequence_logps(h, case["weight"], case["targets"], case["segments"], S)
    sums.sum().backward()
    assert h.grad is not None and case["weight"].grad is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"segments": torch.full((M,), 5)}, "segments must be in"),
        ({"targets": torch.full((M,), V)}, "targets of counted positions"),
        ({"targets": torch.zeros(M - 1, dtype=torch.long)}, "must both have shape"),
        ({"segments": torch.zeros(M, dtype=torch.int32)}, "must be int64"),
        ({"num_segments": -1}, "num_segments"),
    ],
)
def test_bad_arguments(change: dict, message: str):
    case = make_case(torch.float32)
    args = {"targets": case["targets"], "segments": case["segments"].clamp(min=0), "num_segments": S} | change
    with pytest.raises(ValueError, match=message):
        sequence_logps(logits_of(case), **args)
    with pytest.raises(ValueError, match=message):
        fused_sequence_logps(case["hidden"], case["weight"], **args)
