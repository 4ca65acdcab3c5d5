"""The registry: every entry builds from a config dict, computes from a batch exactly as its
pure function, is documented in docs/losses.md, and bad configs fail at construction."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from losslab.errors import UserError
from losslab.losses import (
    LOSSES,
    LossInputs,
    TeacherTopK,
    binary_cross_entropy,
    binary_focal_loss,
    bradley_terry_loss,
    build_composite,
    build_term,
    classification_cross_entropy,
    consistency_loss,
    distillation_loss,
    focal_loss,
    huber_loss,
    info_nce_loss,
    kto_loss,
    l2_penalty,
    l2_sp_penalty,
    margin_ranking_loss,
    mse_loss,
    multiclass_hinge_loss,
    preference_loss,
    semantic_alignment_loss,
    semantic_l2_loss,
    snapshot_parameters,
    token_cross_entropy,
    triplet_loss,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "losses.md"
B, T, V, H, N, C = 3, 5, 7, 4, 6, 3


def full_batch(seed: int = 0) -> LossInputs:
    """A batch with every LossInputs field set (float64, differentiable where it matters)."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    labels[1, 3] = -100
    class_targets = torch.randint(0, C, (N,), generator=g)
    class_targets[2] = -100
    model = torch.nn.Linear(H, 2).double()
    return LossInputs(
        logits=leaf(B, T, V),
        labels=labels,
        token_weights=torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5,
        num_items=20,
        num_sequences=4,
        hidden_states=leaf(B, T, H),
        lm_head_weight=leaf(V, H),
        lm_head_bias=leaf(V),
        attention_mask=torch.ones(B, T, dtype=torch.long),
        class_logits=leaf(N, C),
        class_targets=class_targets,
        predictions=leaf(N),
        targets=torch.randn(N, generator=g, dtype=torch.float64),
        target_mask=torch.tensor([True, True, False, True, True, True]),
        sample_weights=torch.rand(N, generator=g, dtype=torch.float64) + 0.5,
        num_examples=9,
        rewards_chosen=leaf(N),
        rewards_rejected=leaf(N),
        margins=torch.rand(N, generator=g, dtype=torch.float64),
        anchor=leaf(N, H),
        positive=leaf(N, H),
        negative=leaf(N, H),
        chosen_logps=leaf(N),
        rejected_logps=leaf(N),
        ref_chosen_logps=leaf(N),
        ref_rejected_logps=leaf(N),
        chosen_lengths=torch.randint(1, 9, (N,), generator=g),
        rejected_lengths=torch.randint(1, 9, (N,), generator=g),
        policy_logps=leaf(N),
        ref_logps=leaf(N),
        desirable=torch.tensor([True, False, True, True, False, True]),
        kl_baseline=torch.tensor(0.2, dtype=torch.float64),
        teacher_logits=torch.randn(B, T, V, generator=g, dtype=torch.float64),
        teacher_hidden_states=torch.randn(B, T, H + 1, generator=g, dtype=torch.float64),
        teacher_lm_head_weight=torch.randn(V, H + 1, generator=g, dtype=torch.float64),
        teacher_topk=TeacherTopK(*torch.randn(B, T, V, generator=g, dtype=torch.float64).topk(3)),
        model=model,
        reference_params={n: p.detach() + 0.1 for n, p in model.named_parameters()},
    )


def multilabel(batch: LossInputs) -> LossInputs:
    """The same batch with (N, C) 0/1 targets, for the multi-label losses (target_mask and
    sample_weights stay per example, spread over the labels)."""
    targets = (batch.class_logits.detach() > 0).double()
    return LossInputs(**{**batch.__dict__, "class_targets": targets})


# name -> (a config that sets non-default options, the pure-function call it must equal)
EXAMPLES = {
    "token_cross_entropy": (
        {"label_smoothing": 0.1, "z_loss": 1e-3, "focal_gamma": 1.0},
        lambda b: token_cross_entropy(
            b.logits,
            b.labels,
            label_smoothing=0.1,
            z_loss=1e-3,
            focal_gamma=1.0,
            token_weights=b.token_weights,
            num_items=b.num_items,
        ),
    ),
    "cross_entropy": (
        {"class_weights": [1.0, 2.0, 0.5], "label_smoothing": 0.1},
        lambda b: classification_cross_entropy(
            b.class_logits,
            b.class_targets,
            class_weights=[1.0, 2.0, 0.5],
            label_smoothing=0.1,
            weights=b.sample_weights,
            num_items=b.num_examples,
        ),
    ),
    "focal": (
        {"gamma": 1.0, "alpha": [0.2, 0.3, 0.5], "reduction": "sum"},
        lambda b: focal_loss(
            b.class_logits, b.class_targets, gamma=1.0, alpha=[0.2, 0.3, 0.5], weights=b.sample_weights, reduction="sum"
        ),
    ),
    "multiclass_hinge": (
        {"margin": 0.5, "squared": True},
        lambda b: multiclass_hinge_loss(
            b.class_logits,
            b.class_targets,
            margin=0.5,
            squared=True,
            weights=b.sample_weights,
            num_items=b.num_examples,
        ),
    ),
    "binary_cross_entropy": (
        {"pos_weight": 2.0, "label_smoothing": 0.05},
        lambda b: binary_cross_entropy(
            b.class_logits,
            b.class_targets,
            pos_weight=2.0,
            label_smoothing=0.05,
            mask=b.target_mask,
            weights=b.sample_weights,
            num_items=b.num_examples,
        ),
    ),
    "binary_focal": (
        {"gamma": 1.0, "alpha": 0.5},
        lambda b: binary_focal_loss(
            b.class_logits,
            b.class_targets,
            gamma=1.0,
            alpha=0.5,
            mask=b.target_mask,
            weights=b.sample_weights,
            num_items=b.num_examples,
        ),
    ),
    "mse": (
        {"reduction": "sum"},
        lambda b: mse_loss(b.predictions, b.targets, mask=b.target_mask, weights=b.sample_weights, reduction="sum"),
    ),
    "huber": (
        {"delta": 0.5},
        lambda b: huber_loss(
            b.predictions, b.targets, delta=0.5, mask=b.target_mask, weights=b.sample_weights, num_items=b.num_examples
        ),
    ),
    "bradley_terry": (
        {"center_rewards_coefficient": 0.01},
        lambda b: bradley_terry_loss(
            b.rewards_chosen,
            b.rewards_rejected,
            margin=b.margins,
            center_rewards_coefficient=0.01,
            mask=b.target_mask,
            weights=b.sample_weights,
            num_items=b.num_examples,
        ),
    ),
    "margin_ranking": (
        {"margin": 0.5},
        lambda b: margin_ranking_loss(
            b.rewards_chosen,
            b.rewards_rejected,
            margin=0.5,
            mask=b.target_mask,
            weights=b.sample_weights,
            num_items=b.num_examples,
        ),
    ),
    "triplet": (
        {"margin": 0.5, "distance": "cosine", "swap": True},
        lambda b: triplet_loss(
            b.anchor,
            b.positive,
            b.negative,
            margin=0.5,
            distance="cosine",
            swap=True,
            mask=b.target_mask,
            weights=b.sample_weights,
            num_items=b.num_examples,
        ),
    ),
    "info_nce": (
        {"temperature": 0.5, "symmetric": True, "normalize": False},
        lambda b: info_nce_loss(
            b.anchor,
            b.positive,
            negatives=b.negative,
            temperature=0.5,
            symmetric=True,
            normalize=False,
            mask=b.target_mask,
            weights=b.sample_weights,
            num_items=b.num_examples,
        ),
    ),
    "preference": (
        {"loss_type": "ipo", "beta": 0.5, "divergence": "js_divergence"},
        lambda b: preference_loss(
            b.chosen_logps,
            b.rejected_logps,
            b.ref_chosen_logps,
            b.ref_rejected_logps,
            loss_type="ipo",
            beta=0.5,
            divergence="js_divergence",
            chosen_lengths=b.chosen_lengths,
            rejected_lengths=b.rejected_lengths,
            num_items=b.num_sequences,
        ),
    ),
    "kto": (
        {"beta": 0.2, "desirable_weight": 1.5},
        lambda b: kto_loss(b.policy_logps, b.ref_logps, b.desirable, b.kl_baseline, beta=0.2, desirable_weight=1.5),
    ),
    "consistency": (
        {"divergence": "kl"},
        lambda b: consistency_loss(b.logits, b.labels != -100, divergence="kl"),
    ),
    "semantic_l2": (
        {"reduction": "sum"},
        lambda b: semantic_l2_loss(b.hidden_states, b.labels == -100, reduction="sum"),
    ),
    "semantic_alignment": (
        {},
        lambda b: semantic_alignment_loss(b.hidden_states, b.labels == -100, b.labels != -100),
    ),
    "distillation": (
        {"divergence": "jsd", "beta": 0.3, "temperature": 2.0, "top_k": 4},
        lambda b: distillation_loss(
            b.logits, b.teacher_logits, b.labels, divergence="jsd", beta=0.3, temperature=2.0, top_k=4, num_items=20
        ),
    ),
    "l2": (
        {"exclude": ["*bias"], "reduction": "mean"},
        lambda b: l2_penalty(b.model, exclude=["*bias"], reduction="mean"),
    ),
    "l2_sp": (
        {"include": ["weight"]},
        lambda b: l2_sp_penalty(b.model, b.reference_params, include=["weight"]),
    ),
}
MULTILABEL = {"binary_cross_entropy", "binary_focal"}


def test_examples_cover_the_registry():
    assert set(EXAMPLES) == set(LOSSES)


@pytest.mark.parametrize("name", LOSSES)
def test_every_entry_builds_from_a_config_dict_and_equals_its_function(name):
    options, direct = EXAMPLES[name]
    term = build_term({"name": name, "weight": 0.5, **options})
    assert term.name == name and term.label == name and term.weight == 0.5
    batch = full_batch()
    if name in MULTILABEL:
        batch = multilabel(batch)
    value = term(batch)
    assert value.ndim == 0 and torch.isfinite(value)
    expected = direct(batch)
    torch.testing.assert_close(value, expected)
    leaves = [
        t for t in (*vars(batch).values(), *batch.model.parameters()) if isinstance(t, torch.Tensor) and t.requires_grad
    ]
    got = torch.autograd.grad(value, leaves, allow_unused=True)
    want = torch.autograd.grad(expected, leaves, allow_unused=True)
    assert any(g is not None and bool(g.abs().sum() > 0) for g in got)  # it reaches the batch's leaves
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", LOSSES)
def test_every_entry_builds_with_defaults(name):
    term = build_term({"name": name})
    assert term.weight == 1.0
    assert term.options == {key: opt.default for key, opt in LOSSES[name].options().items()}


def doc_sections() -> dict[str, str]:
    text = DOCS.read_text(encoding="utf-8")
    parts = re.split(r"^### `([a-z0-9_]+)`\s*$", text, flags=re.MULTILINE)
    sections = dict(zip(parts[1::2], parts[2::2]))
    for name, body in sections.items():  # a section ends at the next heading of any level
        sections[name] = re.split(r"^#{1,3} ", body, flags=re.MULTILINE)[0]
    return sections


def test_docs_list_exactly_the_registry_with_every_option():
    sections = doc_sections()
    assert list(sections) == list(LOSSES), "docs/losses.md headings must follow the registry"
    for name, spec in LOSSES.items():
        for option in spec.options():
            assert f"`{option}`" in sections[name], f"docs/losses.md: `{name}` does not document option `{option}`"


@pytest.mark.parametrize(
    "config, message",
    [
        ({"name": "focl"}, "unknown loss 'focl'; allowed: token_cross_entropy, cross_entropy, focal,"),
        ({"weight": 1.0}, "unknown loss None; allowed:"),
        (
            {"name": "focal", "gama": 2},
            "unknown option(s) gama; allowed: name, weight, label, gamma, alpha, label_smoothing, reduction",
        ),
        ({"name": "focal", "gamma": -1}, "option gamma=-1: Input should be greater than or equal to 0"),
        ({"name": "focal", "gamma": "2"}, "option gamma='2': Input should be a valid number"),
        ({"name": "cross_entropy", "class_weights": [1, -1, 1]}, "option class_weights=[1, -1, 1]"),
        ({"name": "cross_entropy", "label_smoothing": 1.5}, "less than or equal to 1"),
        ({"name": "token_cross_entropy", "label_smoothing": 2.0}, "label_smoothing must be in [0, 1]; got 2.0"),
        (
            {"name": "token_cross_entropy", "reduction": "none"},
            "reduction must be one of mean, sum, sequence; got 'none'",
        ),
        ({"name": "token_cross_entropy", "chunk_size": 0}, "option chunk_size=0"),
        ({"name": "token_cross_entropy", "ignore_index": 0}, "unknown option(s) ignore_index"),
        ({"name": "mse", "num_items": 4}, "unknown option(s) num_items"),
        ({"name": "l2", "reduction": "none"}, "reduction must be one of sum, mean; got 'none'"),
        ({"name": "l2", "include": "*.weight"}, "'str' instances are not allowed as a Sequence value"),
        (
            {"name": "triplet", "distance": "l3"},
            "Input should be 'euclidean', 'squared_euclidean', 'cosine' or 'manhattan'",
        ),
        ({"name": "consistency", "divergence": "tv"}, "Input should be 'js', 'kl' or 'l1'"),
        ({"name": "multiclass_hinge", "squared": "yes"}, "option squared='yes': Input should be a valid boolean"),
        ({"name": "info_nce", "temperature": 0}, "greater than 0"),
        ({"name": "mse", "label": ""}, "label must be a non-empty string"),
        ({"name": "mse", "weight": "high"}, "must be a number or a schedule"),
        ({"name": "mse", "weight": {"schedule": "cosine", "start": 1, "end": 0}}, "cosine schedule needs total_steps"),
        (["mse"], "a loss term must be a mapping"),
    ],
)
def test_bad_configs_fail_at_construction_saying_what_is_allowed(config, message):
    with pytest.raises(UserError) as info:
        build_term(config, where="run.yaml: loss.terms[0]")
    assert message in str(info.value)
    assert str(info.value).startswith("run.yaml: loss.terms[0]")


@pytest.mark.parametrize(
    "config",
    [
        {"name": "token_cross_entropy", "z_loss": float("nan")},
        {"name": "token_cross_entropy", "focal_gamma": float("nan")},
        {"name": "focal", "gamma": float("nan")},
        {"name": "huber", "delta": float("inf")},  # NaN gradients
        {"name": "info_nce", "temperature": float("inf")},
        {"name": "cross_entropy", "class_weights": [1.0, float("nan")]},
    ],
)
def test_non_finite_options_fail_at_construction(config):
    """NaN passes pydantic's ge/le bounds (YAML spells it .nan); inf passes a lower bound."""
    key = next(k for k in config if k != "name")
    with pytest.raises(UserError, match=f"option {key}=.*finite number"):
        build_term(config, where="run.yaml: loss.terms[0]")


def test_build_composite_errors():
    with pytest.raises(UserError, match=r"loss.terms\[1\]: unknown loss 'nope'"):
        build_composite([{"name": "mse"}, {"name": "nope"}])
    with pytest.raises(UserError, match="repeated: mse"):
        build_composite([{"name": "mse"}, {"name": "mse", "weight": 2}])
    assert [t.label for t in build_composite([{"name": "mse"}, {"name": "mse", "label": "mse_2"}]).terms] == [
        "mse",
        "mse_2",
    ]
    with pytest.raises(UserError, match="expected a list of loss terms"):
        build_composite({"name": "mse"})
    with pytest.raises(UserError, match="at least one term"):
        build_composite([])


def test_composite_errors_name_the_place():
    """Hypothesis found ``loss.terms: []`` reported without its file (tests/test_bad_input.py)."""
    with pytest.raises(UserError, match=r"^cfg.yaml: loss.terms: a composite loss needs at least one term$"):
        build_composite([], where="cfg.yaml: loss.terms")
    with pytest.raises(UserError, match=r"^cfg.yaml: loss.terms: loss term labels must be unique; repeated: mse"):
        build_composite([{"name": "mse"}, {"name": "mse"}], where="cfg.yaml: loss.terms")


def test_missing_inputs_are_named_up_front_and_at_run_time():
    loss = build_composite([{"name": "token_cross_entropy"}, {"name": "bradley_terry"}, {"name": "semantic_l2"}])
    assert loss.missing_inputs({"labels", "logits"}) == [
        "term 'bradley_terry' (bradley_terry) needs rewards_chosen and rewards_rejected",
        "term 'semantic_l2' (semantic_l2) needs hidden_states, or context_mask and hidden_states",
    ]
    assert loss.missing_inputs({"labels", "hidden_states"}) == [
        "term 'token_cross_entropy' (token_cross_entropy) needs logits, or lm_head_weight",
        "term 'bradley_terry' (bradley_terry) needs rewards_chosen and rewards_rejected",
    ]
    with pytest.raises(UserError, match="needs rewards_chosen and rewards_rejected"):
        loss(LossInputs(logits=torch.zeros(1, 2, 3), labels=torch.zeros(1, 2, dtype=torch.long)))


def fake_fused_module(calls: list):
    """Stands in for losslab.losses.fused: logits = hidden @ W^T + b, then the reference loss."""

    def fused_linear_cross_entropy(hidden, weight, labels, *, bias=None, chunk_size=None, **kwargs):
        calls.append({"hidden": tuple(hidden.shape), "labels": tuple(labels.shape), "chunk_size": chunk_size, **kwargs})
        logits = hidden @ weight.T + (bias if bias is not None else 0)
        return token_cross_entropy(logits, labels, **kwargs)

    module = types.ModuleType("losslab.losses.fused")
    module.fused_linear_cross_entropy = fused_linear_cross_entropy
    return module


@pytest.mark.parametrize("reduction", ["mean", "sum", "sequence"])
def test_token_term_uses_the_fused_head_when_logits_are_absent(monkeypatch, reduction):
    calls: list = []
    monkeypatch.setitem(sys.modules, "losslab.losses.fused", fake_fused_module(calls))
    b = full_batch()
    options = {"label_smoothing": 0.1, "z_loss": 1e-3, "focal_gamma": 1.0, "reduction": reduction}
    term = build_term({"name": "token_cross_entropy", "chunk_size": 4, **options})
    logits = b.hidden_states @ b.lm_head_weight.T + b.lm_head_bias
    with_logits = term(
        LossInputs(
            logits=logits,
            labels=b.labels,
            token_weights=b.token_weights,
            num_items=b.num_items,
            num_sequences=b.num_sequences,
        )
    )
    assert calls == []
    fused = term(
        LossInputs(
            hidden_states=b.hidden_states,
            lm_head_weight=b.lm_head_weight,
            lm_head_bias=b.lm_head_bias,
            labels=b.labels,
            token_weights=b.token_weights,
            num_items=b.num_items,
            num_sequences=b.num_sequences,
        )
    )
    torch.testing.assert_close(fused, with_logits)
    (call,) = calls
    assert call["hidden"] == (B, T, H) and call["labels"] == (B, T) and call["chunk_size"] == 4
    assert call["label_smoothing"] == 0.1 and call["focal_gamma"] == 1.0 and call["ignore_index"] == -100
    assert call["reduction"] == reduction
    assert call["num_items"] == (b.num_sequences if reduction == "sequence" else b.num_items)


def test_token_term_with_the_real_fused_head():
    b = full_batch()
    for reduction in ("mean", "sequence"):
        term = build_term(
            {"name": "token_cross_entropy", "label_smoothing": 0.1, "z_loss": 1e-3, "reduction": reduction}
        )
        logits = b.hidden_states @ b.lm_head_weight.T + b.lm_head_bias
        counts = {"num_items": b.num_items, "num_sequences": b.num_sequences}
        expected = term(LossInputs(logits=logits, labels=b.labels, token_weights=b.token_weights, **counts))
        got = term(
            LossInputs(
                hidden_states=b.hidden_states,
                lm_head_weight=b.lm_head_weight,
                lm_head_bias=b.lm_head_bias,
                labels=b.labels,
                token_weights=b.token_weights,
                **counts,
            )
        )
        torch.testing.assert_close(got, expected)
        grads = torch.autograd.grad(got, [b.hidden_states, b.lm_head_weight])
        expected_grads = torch.autograd.grad(expected, [b.hidden_states, b.lm_head_weight])
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e)


def test_snapshot_feeds_l2_sp_as_reference():
    model = torch.nn.Linear(2, 2)
    term = build_term({"name": "l2_sp"})
    assert term(LossInputs(model=model, reference_params=snapshot_parameters(model))).item() == 0.0


def test_yaml_exponent_floats_are_numbers():
    """PyYAML reads `1e-3` (no dot) as a string; configs written that way must still work."""
    yaml = pytest.importorskip("yaml")
    terms = yaml.safe_load(
        "- {name: token_cross_entropy, z_loss: 1e-3}\n"
        "- {name: consistency, weight: {schedule: linear, start: 5e-1, end: 1e-1, total_steps: 10}}\n"
        "- {name: mse, weight: 2e-1}\n"
    )
    assert terms[0]["z_loss"] == "1e-3"  # the YAML 1.1 quirk this guards against
    loss = build_composite(terms)
    assert loss.terms[0].options["z_loss"] == 0.001
    assert loss.weights_at(5) == pytest.approx({"token_cross_entropy": 1.0, "consistency": 0.3, "mse": 0.2})
    with pytest.raises(UserError, match="option gamma='2': Input should be a valid number"):
        build_term({"name": "focal", "gamma": "2"})  # other strings are still not numbers
