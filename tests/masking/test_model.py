"""With a real causal LM (SmolLM2-135M-Instruct, float64): concat and expand give the same
per-token losses on a prefix-stable template; a packed row gives the losses of its samples run
alone; a padded batch too. Short samples keep the float64 forwards cheap on a CPU."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from losslab.masking.build import BuildStats, MaskConfig, build_samples
from losslab.masking.collate import PackedCollator, PaddedCollator

SYSTEM = {"role": "system", "content": "Be brief."}  # shorter than SmolLM2's default system prompt
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green, like grass."},
]
PACK_RECORDS = [
    {"messages": CONVERSATION[:3]},
    {"messages": [SYSTEM, {"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "Yes."}]},
    {"messages": [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]},
]


@pytest.fixture(scope="module")
def model():
    from losslab.models import load_causal_lm

    m = load_causal_lm("builtin:smollm2-135m-instruct", dtype="float64")
    m.eval()
    return m


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of the trained positions, in order: (N,)."""
    logits = logits[0, :-1]  # (T-1, V): position t predicts token t+1
    target = labels[0, 1:]
    keep = target != -100
    return F.cross_entropy(logits[keep], target[keep], reduction="none")


@torch.inference_mode()
def run_alone(model, sample) -> torch.Tensor:
    ids = torch.tensor([sample["input_ids"]])
    return token_losses(model(input_ids=ids).logits, torch.tensor([sample["labels"]]))


@functools.cache
def pack_samples(tokenizer) -> tuple:
    # cut from the start to 12 tokens each: the replies stay, the forwards stay cheap
    return tuple(build_samples(PACK_RECORDS, tokenizer, MaskConfig(max_length=12, truncation="start")))


_alone: dict[str, torch.Tensor] = {}


def alone_losses(model, tokenizer, implementation: str) -> torch.Tensor:
    """The pack samples run one by one, once per attention implementation."""
    if implementation not in _alone:
        model.set_attn_implementation(implementation)
        try:
            _alone[implementation] = torch.cat([run_alone(model, s) for s in pack_samples(tokenizer)])
        finally:
            model.set_attn_implementation("sdpa")
    return _alone[implementation]


def test_concat_and_expand_give_identical_per_token_losses(model, tokenizer) -> None:
    stats = BuildStats()
    (concat,) = build_samples([{"messages": CONVERSATION}], tokenizer, MaskConfig(strategy="auto"), stats=stats)
    assert stats.strategies == {"concat": 1}  # the SmolLM2 template is prefix-stable
    expand = build_samples([{"messages": CONVERSATION}], tokenizer, MaskConfig(strategy="expand"))
    assert len(expand) == 2
    concat_losses = run_alone(model, concat)
    expand_losses = torch.cat([run_alone(model, s) for s in expand])
    assert concat_losses.shape == expand_losses.shape == (sum(lab != -100 for lab in concat["labels"]),)
    torch.testing.assert_close(concat_losses, expand_losses, rtol=0, atol=1e-9)
    assert concat_losses.mean() > 0.01  # a real, non-trivial loss


@torch.inference_mode()
@pytest.mark.parametrize("attention", ["sdpa", "eager", "block_mask"])
def test_packed_row_equals_samples_alone(model, tokenizer, attention) -> None:
    implementation = "eager" if attention == "eager" else "sdpa"
    alone = alone_losses(model, tokenizer, implementation)
    collator = PackedCollator(block_mask_dtype=torch.float64 if attention == "block_mask" else None)
    batch = collator(list(pack_samples(tokenizer)))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "weights")}
    model.set_attn_implementation(implementation)
    try:
        packed = token_losses(model(**inputs).logits, batch["labels"])
        if attention == "sdpa":
            # the trap the collator avoids: with a KV cache (use_cache=True, the config default)
            # transformers does not see the packing and every sample attends to the ones before
            with_cache = token_losses(model(**{**inputs, "use_cache": True}).logits, batch["labels"])
            assert (with_cache - alone).abs().max() > 1e-3
    finally:
        model.set_attn_implementation("sdpa")
    # eager attention takes its softmax in float32 even for a float64 model, so a longer row
    # (more masked entries) rounds differently: equal to float32 precision there
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5 if attention == "eager" else 1e-9)


@torch.inference_mode()
def test_padded_batch_equals_samples_alone(model, tokenizer) -> None:
    samples = list(pack_samples(tokenizer))
    batch = PaddedCollator(tokenizer.pad_token_id)(samples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = torch.cat([token_losses(logits[b : b + 1], batch["labels"][b : b + 1]) for b in range(len(samples))])
    torch.testing.assert_close(got, alone_losses(model, tokenizer, "sdpa"), rtol=0, atol=1e-9)
