"""Preference batch layouts on the tiny Llama: every layout gives the log-probs of each completion
scored alone, and the layouts' masks, positions and targets say what they claim.

Reference: each completion's sum of ``log_softmax`` (float64) over the model's own logits for
``prompt + completion`` run alone (one row, no mask, no padding). Compared: ``concat`` (one
forward for chosen and rejected, padded), ``shared`` (prefix sharing, 4D mask), ``packed``
(several pairs per row) and unpaired items; sdpa and eager attention; float32 to 1e-6 of the
values' magnitude and float64 to 1e-9; gradients of shared == concat in float64.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from losslab.labels import IGNORE_INDEX
from losslab.models import load_model
from losslab.train.tasks.pair_rows import batch_sequence_logps, item_batch, model_inputs, pair_batch

PAD = 0
IMPLEMENTATIONS = ["sdpa", "eager"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rms_norm_in_own_dtype(self: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's formula without its cast to float32 (which rounds a float64 model's states
    and gradients to float32 precision: shared and unshared rows then differ by 1e-7)."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, torch.dtype], torch.nn.Module]:
    """The tiny Llama in eval mode, per attention implementation, in float32 and float64 (its
    RMSNorms computing in float64 too; the rotary tables stay float32, the same in every layout
    for the same position ids)."""
    out = {}
    for impl in IMPLEMENTATIONS:
        model = load_model(AutoModelForCausalLM, "builtin:tiny-llama", attn_implementation=impl).eval()
        out[(impl, torch.float32)] = model
        double = copy.deepcopy(model).to(torch.float64)
        for module in double.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = types.MethodType(rms_norm_in_own_dtype, module)
        out[(impl, torch.float64)] = double
    return out


def make_pairs(n: int, seed: int, *, prompt: tuple[int, int] = (2, 12), completion: tuple[int, int] = (1, 9)):
    gen = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        length = int(torch.randint(lo, hi + 1, (), generator=gen))
        return torch.randint(1, 2000, (length,), generator=gen).tolist()

    return [{"prompt": ids(*prompt), "chosen": ids(*completion), "rejected": ids(*completion)} for _ in range(n)]


def alone(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Sum of log p(completion | prompt), the model run on this sequence alone, float64 softmax."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].double()  # (T, V)
    p = len(prompt)
    logp = torch.log_softmax(logits[p - 1 : p + len(completion) - 1], dim=-1)
    return logp.gather(1, torch.tensor(completion).unsqueeze(1)).sum()


def reference(model: torch.nn.Module, pairs: list[dict]) -> torch.Tensor:
    """(2B,): chosen sums then rejected sums, each scored alone."""
    with torch.no_grad():
        chosen = [alone(model, p["prompt"], p["chosen"]) for p in pairs]
        rejected = [alone(model, p["prompt"], p["rejected"]) for p in pairs]
    return torch.stack(chosen + rejected)


def assert_logps_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    rel = 1e-6 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(got.double(), want, rtol=rel, atol=rel * float(want.abs().max()))


def scored(model: torch.nn.Module, batch: dict, *, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return batch_sequence_logps(model, batch, fused=fused)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["concat", "shared", "packed"])
def test_one_forward_equals_separate_forwards(models, impl: str, dtype: torch.dtype, layout: str):
    """concat (chosen and rejected rows in one padded forward), shared (prompt once) and packed
    (all pairs in one row) == each completion scored alone."""
    model = models[(impl, dtype)]
    pairs = make_pairs(4, seed=1)
    batch = pair_batch(pairs, layout=layout, pad_id=PAD)
    sums, counts = scored(model, batch)
    assert sums.dtype == dtype and sums.shape == (8,)
    assert counts.tolist() == [len(p["chosen"]) for p in pairs] + [len(p["rejected"]) for p in pairs]
    assert_logps_close(sums, reference(model, pairs), dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_shared_equals_unshared(models, impl: str):
    """The prefix-shared row gives what the unshared (concat) rows give, fused or not."""
    for dtype in (torch.float32, torch.float64):
        model = models[(impl, dtype)]
        pairs = make_pairs(3, seed=2)
        shared = scored(model, pair_batch(pairs, layout="shared", pad_id=PAD))[0]
        unshared = scored(model, pair_batch(pairs, layout="concat", pad_id=PAD))[0]
        plain = scored(model, pair_batch(pairs, layout="shared", pad_id=PAD), fused=False)[0]
        assert_logps_close(shared, unshared.double(), dtype)
        assert_logps_close(plain, unshared.double(), dtype)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_padded_equals_packed_equals_alone(models, impl: str):
    """Pairs of very different lengths: shared rows padded to the longest, packed into rows of at
    most 64 tokens (several pairs per row, no padding between), all in one row, and alone."""
    model = models[(impl, torch.float64)]
    pairs = make_pairs(6, seed=3, prompt=(1, 20), completion=(1, 14))
    want = reference(model, pairs)
    padded = pair_batch(pairs, layout="shared", pad_id=PAD)
    packed = pair_batch(pairs, layout="packed", pad_id=PAD, row_tokens=64)
    one_row = pair_batch(pairs, layout="packed", pad_id=PAD)
    assert packed["input_ids"].shape[0] < len(pairs) and one_row["input_ids"].shape[0] == 1
    for batch in (padded, packed, one_row):
        assert_logps_close(scored(model, batch)[0], want, torch.float64)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_unpaired_items_equal_alone(models, layout: str):
    model = models[("sdpa", torch.float64)]
    pairs = make_pairs(5, seed=4)
    items = [{"prompt": p["prompt"], "completion": p["chosen"], "desirable": i % 2 == 0} for i, p in enumerate(pairs)]
    batch = item_batch(items, layout=layout, pad_id=PAD, row_tokens=30)
    sums, counts = scored(model, batch)
    assert batch["num_segments"] == 5 and counts.tolist() == [len(p["chosen"]) for p in pairs]
    assert_logps_close(sums, reference(model, pairs)[:5], torch.float64)
    # labels: the desirable completions only
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(len(p["chosen"]) for p in pairs[::2])


def test_gradients_shared_equal_unshared(models):
    """float64: d(sum_s w_s logp_s)/d(every parameter) is the same through the shared rows as
    through the concat rows, fused head and plain logits alike."""
    model = models[("sdpa", torch.float64)]
    pairs = make_pairs(3, seed=5)
    weights = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def grads(layout: str, fused: bool) -> list[torch.Tensor]:
        model.zero_grad()
        sums, _ = batch_sequence_logps(model, pair_batch(pairs, layout=layout, pad_id=PAD), fused=fused)
        (sums * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    want = grads("concat", fused=False)
    for layout, fused in (("shared", True), ("shared", False), ("packed", True), ("concat", True)):
        for got, ref in zip(grads(layout, fused), want):
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max().clamp(min=1e-12)))
    model.zero_grad(set_to_none=True)


def test_bf16_autocast_sums_in_float32(models):
    model = models[("sdpa", torch.float32)]
    pairs = make_pairs(2, seed=6)
    batch = pair_batch(pairs, layout="shared", pad_id=PAD)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        sums, _ = batch_sequence_logps(model, batch)
    assert sums.dtype == torch.float32 and torch.isfinite(sums).all()
    torch.testing.assert_close(sums.double(), reference(model, pairs), rtol=2e-2, atol=0.5)


def test_labels_and_counts(models):
    """labels (unshifted) mark chosen tokens only; the Trainer's counts over labels[..., 1:]:
    chosen tokens, and rows with a label = pairs for concat and shared."""
    pairs = make_pairs(4, seed=7)
    chosen_tokens = sum(len(p["chosen"]) for p in pairs)
    for layout in ("concat", "shared", "packed"):
        batch = pair_batch(pairs, layout=layout, pad_id=PAD)
        trained = batch["labels"][..., 1:] != IGNORE_INDEX
        assert int(trained.sum()) == chosen_tokens
        rows = int(trained.any(dim=-1).sum())
        assert rows == (1 if layout == "packed" else 4)
        assert batch["num_segments"] == 8
        # position t - 1 predicts labels[t]: the chosen targets, in order
        flat = batch["labels"].reshape(-1)
        chosen = batch["segments"] < 4
        assert torch.equal(flat[batch["score_positions"][chosen] + 1], batch["targets"][chosen])


def test_model_inputs_give_each_attention_its_mask(models):
    """sdpa: bool; eager: additive in the model's dtype (it adds the mask to the scores);
    a 2D mask passes through; no other attention implementation takes a 4D mask."""
    batch = pair_batch(make_pairs(2, seed=8), layout="shared", pad_id=PAD)
    allowed = batch["attention_mask"] == 0
    sdpa = model_inputs(batch, models[("sdpa", torch.float64)])["attention_mask"]
    assert sdpa.dtype == torch.bool and torch.equal(sdpa, allowed)
    eager = model_inputs(batch, models[("eager", torch.float64)])["attention_mask"]
    assert eager.dtype == torch.float64 and torch.equal(eager == 0, allowed)
    assert set(model_inputs(batch, models[("sdpa", torch.float32)])) == {"input_ids", "attention_mask", "position_ids"}
    concat = pair_batch(make_pairs(2, seed=8), layout="concat", pad_id=PAD)
    assert model_inputs(concat, models[("sdpa", torch.float32)])["attention_mask"] is concat["attention_mask"]
    other = copy.copy(models[("sdpa", torch.float32)])
    other.config = copy.copy(other.config)
    other.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa or eager"):
        model_inputs(batch, other)


def test_bad_batches():
    with pytest.raises(ValueError, match="layout must be one of"):
        pair_batch(make_pairs(1, 0), layout="zip", pad_id=PAD)
    with pytest.raises(ValueError, match="at least one token"):
        pair_batch([{"prompt": [], "chosen": [1], "rejected": [2]}], layout="shared", pad_id=PAD)
    with pytest.raises(ValueError, match="missing 'rejected'"):
        pair_batch([{"prompt": [1], "chosen": [1]}], layout="concat", pad_id=PAD)
    with pytest.raises(ValueError, match="at least one record"):
        item_batch([], layout="padded", pad_id=PAD)


# ---- layout invariants on random lengths ------------------------------------------------------


def allowed_of(batch: dict) -> torch.Tensor:
    """(R, T, T) bool: query q attends to key k."""
    mask = batch["attention_mask"]
    if mask.dim() == 4:
        return mask[:, 0] == 0
    width = mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return causal & mask.bool().unsqueeze(1)


def check_invariants(batch: dict, completions: list[tuple[list[int], list[int]]]) -> None:
    """Per segment s with ``completions[s] = (prompt, completion)``: its targets are the
    completion in order; the position predicting token j sees exactly ``prompt + completion[:j]``
    (in order), with position ids 0, 1, ...; padding (id ``PAD``, no record token is 0) comes
    after every token of its row, no token sees it, and (4D masks) it sees itself only."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    allowed = allowed_of(batch)
    for s, (prompt, completion) in enumerate(completions):
        mine = batch["segments"] == s
        assert batch["targets"][mine].tolist() == completion
        for j, where in enumerate(batch["score_positions"][mine].tolist()):
            r, t = divmod(where, ids.shape[1])
            keys = allowed[r, t].nonzero().squeeze(1)
            assert keys.max() == t  # the predictor sees itself, nothing later
            context = prompt + completion[:j]
            assert ids[r, keys].tolist() == context
            assert pos[r, keys].tolist() == list(range(len(context)))
    real = ids != PAD
    for r in range(ids.shape[0]):
        n_real = int(real[r].sum())
        assert real[r, :n_real].all()  # no padding between tokens
        assert not allowed[r, :n_real, n_real:].any()  # no token sees padding
        if batch["attention_mask"].dim() == 4:  # 2D: transformers' own padding rows
            for t in range(n_real, ids.shape[1]):
                assert allowed[r, t].nonzero().squeeze(1).tolist() == [t]
    assert batch["num_segments"] == len(completions)


lengths = st.lists(
    st.tuples(st.integers(1, 6), st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=5
)  # (prompt, chosen, rejected) lengths; empty completions allowed here


@settings(max_examples=60, deadline=None)
@given(lengths=lengths, layout=st.sampled_from(["concat", "shared", "packed"]), row_tokens=st.integers(1, 30))
def test_layout_invariants(lengths: list[tuple[int, int, int]], layout: str, row_tokens: int):
    token = iter(range(1, 10_000))  # distinct tokens: a context is identified by its ids
    pairs = [
        {
            "prompt": [next(token) for _ in range(p)],
            "chosen": [next(token) for _ in range(c)],
            "rejected": [next(token) for _ in range(r)],
        }
        for p, c, r in lengths
    ]
    batch = pair_batch(pairs, layout=layout, pad_id=PAD, row_tokens=row_tokens)
    completions = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
    check_invariants(batch, completions)
    prompts = sum(p for p, _, _ in lengths) * (2 if layout == "concat" else 1)  # concat: every prompt twice
    real = batch["input_ids"] != PAD
    assert int(real.sum()) == prompts + sum(c + r for _, c, r in lengths)
    rows = {"concat": 2 * len(pairs), "shared": len(pairs)}.get(layout)
    if rows is not None:
        assert batch["input_ids"].shape[0] == rows
    else:  # packed: no row over row_tokens unless one pair alone is longer
        assert int(real.sum(dim=1).max()) <= max(row_tokens, max(sum(x) for x in lengths))


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=1, max_size=5), packed=st.booleans())
def test_item_layout_invariants(lengths: list[tuple[int, int]], packed: bool):
    token = iter(range(1, 10_000))
    items = [
        {"prompt": [next(token) for _ in range(p)], "completion": [next(token) for _ in range(c)]} for p, c in lengths
    ]
    batch = item_batch(items, layout="packed" if packed else "padded", pad_id=PAD, row_tokens=12)
    check_invariants(batch, [(i["prompt"], i["completion"]) for i in items])
