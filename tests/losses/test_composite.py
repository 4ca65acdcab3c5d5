"""Composite losses: weighted total, every part and weight returned, schedules at the step."""

from __future__ import annotations

import math

import pytest
import torch

from losslab.errors import UserError
from losslab.losses import (
    CompositeLoss,
    LossInputs,
    LossTerm,
    build_composite,
    consistency_loss,
    semantic_l2_loss,
    token_cross_entropy,
)
from losslab.losses.schedules import CosineSchedule

B, T, V, H = 2, 6, 5, 4


def dialogue_batch() -> LossInputs:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100
    return LossInputs(
        logits=torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True),
        labels=labels,
        hidden_states=torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True),
        attention_mask=torch.tensor([[1] * T, [0] + [1] * (T - 1)]),
    )


ENHANCED = [
    {"name": "token_cross_entropy", "label": "ce"},
    {"name": "consistency", "weight": {"schedule": "cosine", "start": 0.7, "end": 0.1, "warmup_steps": 10}},
    {"name": "semantic_l2", "weight": 0.2},
]


def test_enhanced_dialogue_loss_returns_total_and_every_part():
    loss = build_composite(ENHANCED, total_steps=110)
    batch = dialogue_batch()
    out = loss(batch, step=60)  # cosine halfway: 0.1 + 0.6 / 2
    assert out.weights == pytest.approx({"ce": 1.0, "consistency": 0.4, "semantic_l2": 0.2})
    trained = batch.labels != -100
    context = batch.attention_mask.bool() & ~trained
    expected_parts = {
        "ce": token_cross_entropy(batch.logits, batch.labels),
        "consistency": consistency_loss(batch.logits, trained),
        "semantic_l2": semantic_l2_loss(batch.hidden_states, context),
    }
    assert set(out.values) == set(expected_parts)
    for label, value in expected_parts.items():
        torch.testing.assert_close(out.values[label], value)
    torch.testing.assert_close(out.total, sum(out.weights[k] * v for k, v in expected_parts.items()))
    out.total.backward()
    assert torch.isfinite(batch.logits.grad).all() and batch.hidden_states.grad.abs().sum() > 0


def test_weights_follow_their_schedules_step_by_step():
    loss = build_composite(ENHANCED, total_steps=110)
    steps = {0: 0.0, 5: 0.35, 10: 0.7, 110: 0.1, 500: 0.1}
    for step, value in steps.items():
        assert loss.weights_at(step)["consistency"] == pytest.approx(value), step
        assert loss(dialogue_batch(), step=step).weights["consistency"] == pytest.approx(value)


def test_a_zero_weight_term_is_logged_but_left_out_of_the_total():
    loss = build_composite(ENHANCED, total_steps=110)
    batch = dialogue_batch()
    out = loss(batch, step=0)  # consistency still in warmup: weight 0
    assert out.weights["consistency"] == 0.0
    assert out.values["consistency"].item() > 0 and not out.values["consistency"].requires_grad
    torch.testing.assert_close(out.total, out.values["ce"] + 0.2 * out.values["semantic_l2"])


def test_all_weights_zero_still_gives_a_total_backward_accepts():
    loss = build_composite([{"name": "consistency", "weight": 0}])
    batch = dialogue_batch()
    out = loss(batch)
    out.total.backward()
    assert out.total.item() == 0.0 and out.values["consistency"].item() > 0  # the term is computed, weighted 0
    assert batch.logits.grad is None or torch.count_nonzero(batch.logits.grad) == 0  # no gradient flows


def test_log_dict_is_flat_floats():
    out = build_composite(ENHANCED, total_steps=110)(dialogue_batch(), step=60)
    logged = out.log_dict()
    assert set(logged) == {
        "loss",
        "loss/ce",
        "loss/consistency",
        "loss/semantic_l2",
        "weight/ce",
        "weight/consistency",
        "weight/semantic_l2",
    }
    assert all(isinstance(v, float) and math.isfinite(v) for v in logged.values())
    assert logged["loss"] == pytest.approx(out.total.item())


def test_composite_knows_no_loss_names_any_term_object_works():
    def constant(inputs: LossInputs) -> torch.Tensor:
        return inputs.logits.sum() * 0 + 3.0

    term = LossTerm(
        label="three",
        name="custom",
        weight=CosineSchedule(start=1.0, end=0.0, total_steps=2),
        compute=constant,
        requires=(frozenset({"logits"}),),
    )
    out = CompositeLoss([term])(dialogue_batch(), step=1)
    assert out.weights == {"three": pytest.approx(0.5)} and out.total.item() == pytest.approx(1.5)
    with pytest.raises(UserError, match="term 'three' \\(custom\\) needs logits"):
        CompositeLoss([term])(LossInputs(labels=torch.zeros(1, dtype=torch.long)))


def test_context_mask_defaults_and_override():
    batch = dialogue_batch()
    expected = batch.attention_mask.bool() & (batch.labels == -100)
    assert torch.equal(batch.resolved_context_mask(), expected)
    override = torch.zeros(B, T, dtype=torch.bool)
    override[:, 0] = True
    batch.context_mask = override
    assert torch.equal(batch.resolved_context_mask(), override)


def test_micro_batches_add_up_for_count_normalised_terms():
    """With the global counts in the batch, the composite of 2 micro-batches sums to the whole."""
    loss = build_composite(
        [
            {"name": "token_cross_entropy", "label_smoothing": 0.1},
            {"name": "token_cross_entropy", "label": "per_seq", "reduction": "sequence", "weight": 0.5},
        ]
    )
    batch = dialogue_batch()
    counts = {"num_items": int((batch.labels != -100).sum()), "num_sequences": B}
    whole = loss(LossInputs(logits=batch.logits, labels=batch.labels), step=0).total
    parts = sum(
        loss(LossInputs(logits=batch.logits[i : i + 1], labels=batch.labels[i : i + 1], **counts), step=0).total
        for i in range(B)
    )
    assert abs(parts.item() - whole.item()) < 1e-12
