"""Preference losses: every loss_type and divergence against a plain float64 transcription of
its published formula (values, gradients, gradcheck), the edge cases (equal completions, huge
margins, label smoothing at its bounds), which inputs each type takes, the up-front report of
missing fields, KTO, and exact normalisation over micro-batches."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from losslab.errors import UserError
from losslab.losses import LossInputs, build_composite, build_term, kto_loss, preference_loss
from losslab.losses.preference import DIVERGENCE_TYPES, LOSS_TYPES, uses_lengths, uses_reference

from ..conftest import train_config

B = 5
DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
SMOOTHING = {"robust": 0.2, "exo_pair": 0.05, "aot": 0.1, "aot_unpaired": 0.1, "simpo": 0.1, "cpo": 0.1}


# ---- the published formulas, written out plainly in float64 -------------------------------------


def sig(x):
    return 1 / (1 + torch.exp(-x))


def log_sig(x):
    return torch.log(sig(x))


def smoothed(x, eps):
    """Conservative labels: -(1 - eps) log sig(x) - eps log sig(-x)."""
    return -(1 - eps) * log_sig(x) - eps * log_sig(-x)


def f_prime(r, divergence, alpha):
    """f'(u) at u = exp(r) for the f-DPO divergences, with the constants TRL drops dropped (they
    cancel in s_c - s_r; test_paper_constants_cancel_for_the_sigmoid_loss checks that)."""
    u = torch.exp(r)
    if divergence == "reverse_kl":  # f(u) = u log u: f'(u) = log u + 1
        return torch.log(u)
    if divergence == "forward_kl":  # f(u) = -log u: f'(u) = -1/u
        return -1 / u
    if divergence == "js_divergence":  # f'(u) = log(2u / (1 + u)), minus log 2
        return torch.log(u / (1 + u))
    return u ** (alpha - 1) / (alpha - 1)  # (u^(alpha-1) - 1) / (alpha - 1), minus the constant


def sort_by_value(x):
    order = sorted(range(len(x)), key=lambda i: float(x[i].detach()))
    return x[order]


def log_odds(avg_logp):
    p = torch.exp(avg_logp)
    return torch.log(p / (1 - p))


def expected(pi_c, pi_r, ref_c, ref_r, len_c, len_r, *, loss_type, beta, eps, tau, gamma, divergence, alpha):
    """Per-pair losses of ``loss_type`` (see docs/losses.md for the papers)."""
    if loss_type == "cpo":
        return smoothed(beta * (pi_c - pi_r), eps)
    if loss_type == "simpo":
        return smoothed(beta * (pi_c / len_c - pi_r / len_r) - gamma, eps)
    if loss_type == "orpo":
        return -beta * log_sig(log_odds(pi_c / len_c) - log_odds(pi_r / len_r))
    r_c, r_r = pi_c - ref_c, pi_r - ref_r
    s_c, s_r = f_prime(r_c, divergence, alpha), f_prime(r_r, divergence, alpha)
    z = beta * (s_c - s_r)
    formulas = {
        "sigmoid": lambda: -log_sig(z),
        "hinge": lambda: torch.clamp(1 - z, min=0),
        "ipo": lambda: (s_c / len_c - s_r / len_r - 1 / (2 * beta)) ** 2,
        "exo_pair": lambda: sig(z) * (log_sig(z) - math.log(1 - eps)) + sig(-z) * (log_sig(-z) - math.log(eps)),
        "nca_pair": lambda: -log_sig(beta * s_c) - 0.5 * log_sig(-beta * s_c) - 0.5 * log_sig(-beta * s_r),
        "robust": lambda: ((1 - eps) * -log_sig(z) - eps * -log_sig(-z)) / (1 - 2 * eps),
        "bco_pair": lambda: -log_sig(beta * s_c) - log_sig(-beta * s_r),
        "sppo_hard": lambda: (s_c - 1 / (2 * beta)) ** 2 + (s_r + 1 / (2 * beta)) ** 2,
        "aot": lambda: smoothed(beta * (sort_by_value(pi_c - pi_r) - sort_by_value(ref_c - ref_r)), eps),
        "aot_unpaired": lambda: smoothed(beta * (sort_by_value(r_c) - sort_by_value(r_r)), eps),
        "apo_zero": lambda: (1 - sig(beta * r_c)) + sig(beta * r_r),
        "apo_down": lambda: sig(beta * r_c) + (1 - sig(z)),
        "discopop": lambda: (1 - sig(z / tau)) * -log_sig(z) + sig(z / tau) * torch.exp(-z),
        "sigmoid_norm": lambda: -log_sig(beta * (s_c / len_c - s_r / len_r)),
    }
    return formulas[loss_type]()


# ---- cases -------------------------------------------------------------------------------------


def case_options(loss_type: str, divergence: str = "reverse_kl") -> dict:
    """Non-default options that ``loss_type`` reads."""
    options = {"loss_type": loss_type, "beta": 0.3, "divergence": divergence}
    if loss_type in SMOOTHING:
        options["label_smoothing"] = SMOOTHING[loss_type]
    if loss_type == "discopop":
        options["discopop_tau"] = 0.2
    if loss_type == "simpo":
        options["simpo_gamma"] = 0.7
    if divergence == "alpha_divergence":
        options["divergence_alpha"] = 0.3
    return options


CASES = [(t, "reverse_kl") for t in LOSS_TYPES] + [
    (t, d) for t in LOSS_TYPES if t in DIVERGENCE_TYPES for d in DIVERGENCES[1:]
]


def batch(seed: int = 0, dtype=torch.float64, n: int = B):
    """Policy log-probs (negative: averages are log-probabilities), reference log-probs near
    them (log-ratios of order 1), and lengths 1..9."""
    g = torch.Generator().manual_seed(seed)
    pi_c = -(torch.rand(n, generator=g, dtype=torch.float64) * 8 + 1)
    pi_r = -(torch.rand(n, generator=g, dtype=torch.float64) * 8 + 1)
    ref_c = pi_c + torch.randn(n, generator=g, dtype=torch.float64)
    ref_r = pi_r + torch.randn(n, generator=g, dtype=torch.float64)
    len_c = torch.randint(1, 10, (n,), generator=g)
    len_r = torch.randint(1, 10, (n,), generator=g)
    return [t.to(dtype) for t in (pi_c, pi_r, ref_c, ref_r)] + [len_c, len_r]


def call(pi_c, pi_r, ref_c, ref_r, len_c, len_r, *, loss_type="sigmoid", **options):
    """``preference_loss`` given exactly the inputs ``loss_type`` reads."""
    refs = (ref_c, ref_r) if uses_reference(loss_type) else ()
    lengths = {"chosen_lengths": len_c, "rejected_lengths": len_r} if uses_lengths(loss_type) else {}
    return preference_loss(pi_c, pi_r, *refs, loss_type=loss_type, **lengths, **options)


def reference(pi_c, pi_r, ref_c, ref_r, len_c, len_r, *, loss_type="sigmoid", **options):
    return expected(
        pi_c,
        pi_r,
        ref_c,
        ref_r,
        len_c.double(),
        len_r.double(),
        loss_type=loss_type,
        beta=options.get("beta", 0.1),
        eps=options.get("label_smoothing", 0.0),
        tau=options.get("discopop_tau", 0.05),
        gamma=options.get("simpo_gamma", 0.5),
        divergence=options.get("divergence", "reverse_kl"),
        alpha=options.get("divergence_alpha", 0.5),
    )


# ---- every formula -----------------------------------------------------------------------------


@pytest.mark.parametrize(("loss_type", "divergence"), CASES)
def test_every_type_and_divergence_equals_its_formula(loss_type, divergence):
    options = case_options(loss_type, divergence)
    *logps, len_c, len_r = batch()
    leaves = [t.clone().requires_grad_() for t in logps]
    got = call(*leaves, len_c, len_r, reduction="none", **options)
    want = reference(*leaves, len_c, len_r, **options)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)  # a different weight per pair
    used = leaves if uses_reference(loss_type) else leaves[:2]
    grads = torch.autograd.grad((got * weights).sum(), used)
    want_grads = torch.autograd.grad((want * weights).sum(), used)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert any(bool(g.abs().sum() > 0) for g in grads[:2])

    def fn(*tensors):
        return call(*tensors, *leaves[len(tensors) :], len_c, len_r, reduction="sum", **options)

    assert torch.autograd.gradcheck(fn, tuple(t.detach().clone().requires_grad_() for t in used))


def test_hand_worked_numbers():
    """sigmoid at margin 0 is ln 2; one DPO value by hand: beta 0.1, r_c = 2, r_r = -1 -> z = 0.3."""
    zero = torch.zeros(1, dtype=torch.float64)
    assert preference_loss(zero, zero, zero, zero).item() == pytest.approx(math.log(2), abs=1e-15)
    value = preference_loss(
        torch.tensor([-3.0]), torch.tensor([-6.0]), torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1
    )
    assert value.item() == pytest.approx(math.log(1 + math.exp(-0.3)), rel=1e-6)


def test_paper_constants_cancel_for_the_sigmoid_loss():
    """TRL drops f'(u)'s constants (1 for reverse KL, 1 for forward KL's 1 - 1/u, log 2 for JS,
    -1/(alpha-1)); with them the f-DPO paper's sigmoid loss is the same."""
    logps = batch(3)[:4]
    pi_c, pi_r, ref_c, ref_r = logps
    u_c, u_r = torch.exp(pi_c - ref_c), torch.exp(pi_r - ref_r)
    alpha = 0.3
    paper = {
        "reverse_kl": lambda u: torch.log(u) + 1,
        "forward_kl": lambda u: 1 - 1 / u,
        "js_divergence": lambda u: torch.log(2 * u / (1 + u)),
        "alpha_divergence": lambda u: (u ** (alpha - 1) - 1) / (alpha - 1),
    }
    for divergence, f in paper.items():
        extra = {"divergence_alpha": alpha} if divergence == "alpha_divergence" else {}
        got = preference_loss(*logps, beta=0.3, divergence=divergence, reduction="none", **extra)
        torch.testing.assert_close(got, -log_sig(0.3 * (f(u_c) - f(u_r))), rtol=1e-10, atol=1e-12)


def test_alpha_divergence_limits():
    """alpha = 1 is reverse KL (TRL's fallback), alpha = 0 is forward KL."""
    logps = batch(4)[:4]
    dpo = preference_loss(*logps, reduction="none")
    torch.testing.assert_close(
        preference_loss(*logps, divergence="alpha_divergence", divergence_alpha=1.0, reduction="none"), dpo
    )
    torch.testing.assert_close(
        preference_loss(*logps, divergence="alpha_divergence", divergence_alpha=0.0, reduction="none"),
        preference_loss(*logps, divergence="forward_kl", reduction="none"),
    )


# ---- edge cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("loss_type", "divergence"), CASES)
def test_equal_chosen_and_rejected(loss_type, divergence):
    options = case_options(loss_type, divergence)
    pi_c, _, ref_c, _, len_c, _ = batch(5)
    leaves = [pi_c.clone().requires_grad_(), pi_c.clone().requires_grad_()]
    got = call(*leaves, ref_c, ref_c, len_c, len_c, reduction="none", **options)
    torch.testing.assert_close(got, reference(*leaves, ref_c, ref_c, len_c, len_c, **options))
    grads = torch.autograd.grad(got.sum(), leaves)
    assert all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize(
    ("loss_type", "value"),
    [
        ("sigmoid", math.log(2)),
        ("hinge", 1.0),
        ("robust", math.log(2)),
        ("aot", math.log(2)),
        ("aot_unpaired", math.log(2)),
        ("apo_zero", 1.0),
        ("apo_down", 1.0),
        ("discopop", 0.5 * math.log(2) + 0.5),
        ("sigmoid_norm", math.log(2)),
        ("sppo_hard", 2 * (1 / 0.2) ** 2),
        ("ipo", (1 / 0.2) ** 2),
        ("cpo", math.log(2)),
        ("orpo", 0.1 * math.log(2)),
        ("simpo", math.log(1 + math.exp(0.5))),
    ],
)
def test_equal_chosen_and_rejected_by_hand(loss_type, value):
    """With chosen == rejected == reference (log-ratios 0): the value of each formula at 0."""
    logps = torch.full((3,), -2.0, dtype=torch.float64)
    lengths = torch.full((3,), 4)
    assert call(logps, logps, logps, logps, lengths, lengths, loss_type=loss_type).item() == pytest.approx(
        value, rel=1e-12
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("loss_type", "divergence"), CASES)
def test_huge_margins_stay_finite(loss_type, divergence, dtype):
    """|margin| 1e4 both ways (log-ratios 4 and -9995): finite values and gradients; the
    sigmoid-family losses saturate exactly instead of overflowing."""
    options = case_options(loss_type, divergence)
    pi_c = torch.tensor([-1.0, -1e4], dtype=dtype, requires_grad=True)
    pi_r = torch.tensor([-1e4, -1.0], dtype=dtype, requires_grad=True)
    ref = torch.full((2,), -5.0, dtype=dtype)
    lengths = torch.ones(2, dtype=torch.long)
    loss = call(pi_c, pi_r, ref, ref, lengths, lengths, reduction="none", **options)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert bool(torch.isfinite(loss).all()), loss
    grads = torch.autograd.grad(loss.sum(), [pi_c, pi_r])
    assert all(g.dtype == dtype and bool(torch.isfinite(g).all()) for g in grads), grads
    if loss_type in ("sigmoid", "sigmoid_norm") and divergence == "reverse_kl":
        # pair 0 is won by 1e4 nats: its loss is 0; pair 1 lost: beta * 1e4 (up to bfloat16's rounding)
        assert loss[0].item() == 0 and loss[1].item() == pytest.approx(0.3 * (1e4 - 1), rel=1e-2)


def test_orpo_with_a_certain_completion():
    """A mean log-prob of exactly 0 (probability 1): log(1 - e^0) would be -inf; it is capped."""
    zero, other = torch.zeros(2, requires_grad=True), torch.tensor([-0.5, -3.0], requires_grad=True)
    lengths = torch.ones(2)
    loss = preference_loss(zero, other, loss_type="orpo", chosen_lengths=lengths, rejected_lengths=lengths)
    assert torch.isfinite(loss)
    assert all(bool(torch.isfinite(g).all()) for g in torch.autograd.grad(loss, [zero, other]))


@pytest.mark.parametrize(
    ("loss_type", "eps"),
    [("robust", 0.0), ("robust", 0.4999), ("exo_pair", 1e-9), ("exo_pair", 1 - 1e-9)]
    + [(t, e) for t in ("aot", "aot_unpaired", "simpo", "cpo") for e in (0.0, 0.5)],
)
def test_label_smoothing_at_its_bounds(loss_type, eps):
    *logps, len_c, len_r = batch(6)
    leaves = [t.clone().requires_grad_() for t in logps]
    options = {"loss_type": loss_type, "beta": 0.3, "label_smoothing": eps}
    got = call(*leaves, len_c, len_r, reduction="none", **options)
    want = reference(*leaves, len_c, len_r, **options)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    for g, w in zip(torch.autograd.grad(got.sum(), leaves[:2]), torch.autograd.grad(want.sum(), leaves[:2])):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-8)


def test_smoothing_limits():
    """robust at eps = 0 is DPO; conservative labels at eps = 0.5 are symmetric in the margin."""
    logps = batch(7)[:4]
    torch.testing.assert_close(
        preference_loss(*logps, loss_type="robust", label_smoothing=0.0), preference_loss(*logps)
    )
    pi_c, pi_r = logps[:2]
    torch.testing.assert_close(
        preference_loss(pi_c, pi_r, loss_type="cpo", label_smoothing=0.5),
        preference_loss(pi_r, pi_c, loss_type="cpo", label_smoothing=0.5),
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss_type": "robust", "label_smoothing": 0.5}, "robust needs label_smoothing < 0.5"),
        ({"loss_type": "exo_pair"}, r"exo_pair needs label_smoothing in \(0, 1\)"),
        ({"loss_type": "exo_pair", "label_smoothing": 1.0}, r"exo_pair needs label_smoothing in \(0, 1\)"),
        ({"loss_type": "aot", "label_smoothing": 0.6}, "aot needs label_smoothing <= 0.5"),
        ({"label_smoothing": 0.1}, "loss_type sigmoid does not use label_smoothing"),
        ({"loss_type": "aot", "divergence": "js_divergence"}, "loss_type aot does not use divergence"),
        ({"divergence_alpha": 0.3}, "divergence_alpha is used only with divergence alpha_divergence"),
        ({"discopop_tau": 0.1}, "discopop_tau is used only by loss_type discopop"),
        ({"simpo_gamma": 1.0}, "simpo_gamma is used only by loss_type simpo"),
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": float("nan")}, "beta must be a finite number"),
        ({"loss_type": "dpo"}, "loss_type must be one of sigmoid, hinge, ipo"),
        ({"divergence": "kl"}, "divergence must be one of reverse_kl"),
        ({"reduction": "avg"}, "reduction must be one of"),
    ],
)
def test_bad_options_raise(options, message):
    logps = batch()[:4]
    with pytest.raises(ValueError, match=message):
        preference_loss(*logps, **options)


# ---- which inputs each type takes ----------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "orpo"])
def test_reference_free_types_refuse_reference_inputs(loss_type):
    pi_c, pi_r, ref_c, ref_r, len_c, len_r = batch()
    lengths = {"chosen_lengths": len_c, "rejected_lengths": len_r} if loss_type != "cpo" else {}
    with pytest.raises(ValueError, match=f"loss_type {loss_type} is reference-free: it takes no ref_chosen_logps"):
        preference_loss(pi_c, pi_r, ref_c, ref_r, loss_type=loss_type, **lengths)
    with pytest.raises(ValueError, match="takes no ref_rejected_logps"):
        preference_loss(pi_c, pi_r, None, ref_r, loss_type=loss_type, **lengths)


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if uses_reference(t)])
def test_reference_types_need_reference_inputs(loss_type):
    pi_c, pi_r, ref_c, _, len_c, len_r = batch()
    lengths = {"chosen_lengths": len_c, "rejected_lengths": len_r} if uses_lengths(loss_type) else {}
    options = {k: v for k, v in case_options(loss_type).items() if k != "beta"}
    with pytest.raises(ValueError, match=f"loss_type {loss_type} compares with a reference model: it needs ref_rej"):
        preference_loss(pi_c, pi_r, ref_c, **lengths, **options)


def test_lengths_are_needed_by_the_averaging_types_and_refused_by_the_others():
    pi_c, pi_r, ref_c, ref_r, len_c, len_r = batch()
    with pytest.raises(ValueError, match="loss_type ipo averages over completion tokens: it needs chosen_lengths"):
        preference_loss(pi_c, pi_r, ref_c, ref_r, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_type sigmoid uses summed log-probs: it takes no chosen_lengths"):
        preference_loss(pi_c, pi_r, ref_c, ref_r, chosen_lengths=len_c, rejected_lengths=len_r)
    with pytest.raises(ValueError, match="must have the log-probs' shape"):
        preference_loss(pi_c, pi_r, loss_type="simpo", chosen_lengths=len_c[:2], rejected_lengths=len_r)
    with pytest.raises(ValueError, match="shapes must match"):
        preference_loss(pi_c, pi_r[:2], ref_c, ref_r)
    with pytest.raises(ValueError, match=r"must be \(B,\)"):
        preference_loss(pi_c[:, None], pi_r[:, None], ref_c[:, None], ref_r[:, None])


def full_preference_batch(seed: int = 0, **counts) -> LossInputs:
    pi_c, pi_r, ref_c, ref_r, len_c, len_r = batch(seed)
    return LossInputs(
        chosen_logps=pi_c.requires_grad_(),
        rejected_logps=pi_r.requires_grad_(),
        ref_chosen_logps=ref_c,
        ref_rejected_logps=ref_r,
        chosen_lengths=len_c,
        rejected_lengths=len_r,
        **counts,
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_term_passes_each_type_only_what_it_reads(loss_type):
    """A batch carries reference log-probs and lengths for every type; the term gives each
    type those it reads (so simpo is not refused for the batch's reference log-probs)."""
    options = case_options(loss_type)
    term = build_term({"name": "preference", **options})
    inputs = full_preference_batch(num_sequences=8)
    value = term(inputs)
    b = inputs
    direct = call(
        b.chosen_logps,
        b.rejected_logps,
        b.ref_chosen_logps,
        b.ref_rejected_logps,
        b.chosen_lengths,
        b.rejected_lengths,
        num_items=8,
        **options,
    )
    torch.testing.assert_close(value, direct)
    assert term.batch_additive  # sum over pairs / the step's count of pairs


def test_missing_fields_depend_on_the_loss_type():
    loss = build_composite(
        [
            {"name": "preference"},
            {"name": "preference", "label": "ipo", "loss_type": "ipo"},
            {"name": "preference", "label": "simpo", "loss_type": "simpo"},
            {"name": "preference", "label": "cpo", "loss_type": "cpo"},
            {"name": "kto"},
        ]
    )
    assert loss.missing_inputs({"chosen_logps", "rejected_logps"}) == [
        "term 'preference' (preference, loss_type sigmoid) needs ref_chosen_logps and ref_rejected_logps",
        (
            "term 'ipo' (preference, loss_type ipo) needs chosen_lengths and ref_chosen_logps and ref_rejected_logps "
            "and rejected_lengths"
        ),
        "term 'simpo' (preference, loss_type simpo) needs chosen_lengths and rejected_lengths",
        "term 'kto' (kto) needs desirable and kl_baseline and policy_logps and ref_logps",
    ]
    everything = {
        "chosen_logps",
        "rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "chosen_lengths",
        "rejected_lengths",
        "policy_logps",
        "ref_logps",
        "desirable",
        "kl_baseline",
    }
    assert loss.missing_inputs(everything) == []


def preference_config(tmp_path, terms):
    from losslab.train.config import TrainConfig

    return TrainConfig.model_validate(train_config(tmp_path, loss={"terms": terms}))


def test_plan_loss_lists_what_a_task_does_not_provide(tmp_path):
    """Before any model loads: a causal_lm batch has no sequence log-probs."""
    from losslab.train.task import plan_loss

    with pytest.raises(UserError) as info:
        plan_loss(preference_config(tmp_path, [{"name": "preference"}]))
    assert str(info.value).startswith(
        "loss.terms: term 'preference' (preference, loss_type sigmoid) needs chosen_logps and ref_chosen_logps "
        "and ref_rejected_logps and rejected_logps; a causal_lm batch provides"
    )


def test_plan_loss_with_a_task_without_reference_log_probs(tmp_path, monkeypatch):
    """A task whose batches carry the policy's log-probs and lengths but no reference: the
    reference types are refused up front (naming the missing fields), the reference-free ones
    pass, and ``LossPlan.requires`` tells the task whether to compute reference log-probs."""
    from losslab.train import task as task_module
    from losslab.train.task import LossNeeds, plan_loss

    policy = frozenset({"chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths"})
    provides = {"value": policy}
    toy = SimpleNamespace(
        loss_needs=lambda config: LossNeeds("toy preference", ({"name": "preference"},), provides["value"])
    )
    monkeypatch.setattr(task_module, "get_task", lambda name: toy)
    with pytest.raises(UserError) as info:
        plan_loss(preference_config(tmp_path, [{"name": "preference", "loss_type": "ipo"}]))
    assert str(info.value) == (
        "loss.terms: term 'preference' (preference, loss_type ipo) needs ref_chosen_logps and ref_rejected_logps; "
        "a toy preference batch provides chosen_lengths, chosen_logps, rejected_lengths, rejected_logps"
    )
    for loss_type in ("simpo", "cpo", "orpo"):
        plan_loss(preference_config(tmp_path, [{"name": "preference", "loss_type": loss_type}]))

    provides["value"] = policy | {"ref_chosen_logps", "ref_rejected_logps"}
    sigmoid = plan_loss(preference_config(tmp_path, [{"name": "preference"}]))
    simpo = plan_loss(preference_config(tmp_path, [{"name": "preference", "loss_type": "simpo"}]))
    assert sigmoid.requires("ref_chosen_logps") and not sigmoid.requires("chosen_lengths")
    assert not simpo.requires("ref_chosen_logps") and simpo.requires("chosen_lengths")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"loss_type": "dpo"}, "option loss_type='dpo': Input should be 'sigmoid', 'hinge', 'ipo'"),
        ({"label_smoothing": 0.1}, "loss_type sigmoid does not use label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "robust needs label_smoothing < 0.5"),
        ({"label_smoothing": 1.0}, "option label_smoothing=1.0: Input should be less than 1"),
        ({"beta": 0}, "option beta=0: Input should be greater than 0"),
        ({"divergence": "tv"}, "Input should be 'reverse_kl', 'forward_kl', 'js_divergence' or 'alpha_divergence'"),
        ({"reduction": "none"}, "reduction must be one of mean, sum; got 'none'"),
        ({"num_items": 3}, "unknown option(s) num_items"),
        ({"chosen_lengths": 3}, "unknown option(s) chosen_lengths"),
    ],
)
def test_bad_term_configs_fail_at_construction(config, message):
    with pytest.raises(UserError) as info:
        build_term({"name": "preference", **config}, where="run.yaml: loss.terms[0]")
    assert message in str(info.value) and str(info.value).startswith("run.yaml: loss.terms[0]")


# ---- normalisation over micro-batches ------------------------------------------------------------


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in ("aot", "aot_unpaired")])
def test_micro_batches_add_up_to_the_whole_batch(loss_type):
    """sum over micro-batches of (sum / global count) == the whole batch's mean, values and
    gradients; through the composite, with the count as ``num_sequences``."""
    options = case_options(loss_type)
    n = 8
    *logps, len_c, len_r = batch(8, n=n)
    leaves = [t.clone().requires_grad_() for t in logps]
    whole = call(*leaves, len_c, len_r, **options)
    parts = [
        call(*(t[s] for t in leaves), len_c[s], len_r[s], num_items=n, **options)
        for s in (slice(0, 3), slice(3, 4), slice(4, 8))
    ]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(sum(parts), leaves[:2]), torch.autograd.grad(whole, leaves[:2])):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)

    loss = build_composite([{"name": "preference", **options}])
    names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    micro = []
    for s in (slice(0, 5), slice(5, 8)):
        fields = dict(zip(names, (t[s] for t in leaves)), chosen_lengths=len_c[s], rejected_lengths=len_r[s])
        micro.append(loss(LossInputs(**fields, num_sequences=n), per_batch_scale=0.5).total)
    torch.testing.assert_close(sum(micro), whole, rtol=1e-12, atol=1e-12)


def test_sum_and_empty_batches():
    logps = batch()[:4]
    torch.testing.assert_close(
        preference_loss(*logps, reduction="sum"), preference_loss(*logps, reduction="none").sum()
    )
    empty = [torch.zeros(0, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    value = preference_loss(*empty)
    assert value.item() == 0.0
    assert all(g is not None for g in torch.autograd.grad(value, empty[:2]))


def test_low_precision_inputs_compute_in_float32():
    pi_c, pi_r, ref_c, ref_r, _, _ = batch()
    low = [t.to(torch.bfloat16).requires_grad_() for t in (pi_c, pi_r)]
    value = preference_loss(*low, ref_c.to(torch.bfloat16), ref_r.to(torch.bfloat16))
    assert value.dtype == torch.float32
    expected32 = preference_loss(*(t.detach().float() for t in low), ref_c.bfloat16().float(), ref_r.bfloat16().float())
    torch.testing.assert_close(value, expected32)
    assert all(g.dtype == torch.bfloat16 for g in torch.autograd.grad(value, low))


# ---- KTO -----------------------------------------------------------------------------------------


def kto_expected(policy, ref, desirable, z0, beta, w_d, w_u):
    """Per item: desirable w_d (1 - sig(beta (r - z0))), undesirable w_u (1 - sig(beta (z0 - r)))."""
    r = policy - ref
    return torch.where(desirable, w_d * (1 - sig(beta * (r - z0))), w_u * (1 - sig(beta * (z0 - r))))


def kto_batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    policy = -(torch.rand(n, generator=g, dtype=torch.float64) * 10 + 1)
    ref = policy + 2 * torch.randn(n, generator=g, dtype=torch.float64)
    desirable = torch.tensor([True, False, True, True, False, False])[:n]
    return policy, ref, desirable, torch.tensor(0.4, dtype=torch.float64)


def test_kto_equals_its_formula_with_weights_and_baseline():
    policy, ref, desirable, z0 = kto_batch()
    options = {"beta": 0.3, "desirable_weight": 1.5, "undesirable_weight": 0.7}
    leaves = [policy.clone().requires_grad_(), ref.clone().requires_grad_()]
    got = kto_loss(*leaves, desirable, z0, reduction="none", **options)
    want = kto_expected(*leaves, desirable, z0, 0.3, 1.5, 0.7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    mean = kto_loss(*leaves, desirable, z0, **options)
    torch.testing.assert_close(mean, want.mean())  # over all items, desirable and undesirable together
    for g, w in zip(torch.autograd.grad(mean, leaves), torch.autograd.grad(want.mean(), leaves)):
        torch.testing.assert_close(g, w)
    assert torch.autograd.gradcheck(
        lambda p, r: kto_loss(p, r, desirable, z0, reduction="sum", **options),
        tuple(t.detach().clone().requires_grad_() for t in leaves),
    )
    # the baseline shifts every item's reward and is not differentiated
    z0_leaf = z0.clone().requires_grad_()
    moved = kto_loss(policy, ref, desirable, z0_leaf + 1.0, **options)
    torch.testing.assert_close(moved, kto_expected(policy, ref, desirable, z0 + 1.0, 0.3, 1.5, 0.7).mean())
    assert not moved.requires_grad
    torch.testing.assert_close(
        kto_loss(policy, ref, desirable, 0.4, **options), kto_loss(policy, ref, desirable, z0, **options)
    )


@pytest.mark.parametrize("kind", [True, False])
def test_kto_with_items_of_one_kind(kind):
    policy, ref, _, z0 = kto_batch()
    desirable = torch.full((6,), kind)
    leaf = policy.clone().requires_grad_()
    value = kto_loss(leaf, ref, desirable, z0, desirable_weight=2.0, undesirable_weight=0.5)
    assert torch.isfinite(value)
    torch.testing.assert_close(value, kto_expected(policy, ref, desirable, z0, 0.1, 2.0, 0.5).mean())
    assert bool(torch.isfinite(torch.autograd.grad(value, leaf)[0]).all())
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    assert kto_loss(empty, empty, torch.zeros(0, dtype=torch.bool), z0).item() == 0.0


def test_kto_huge_log_ratios_and_bad_inputs():
    policy = torch.tensor([-1.0, -1e4, -1.0, -1e4], requires_grad=True)
    ref = torch.tensor([-1e4, -1.0, -1e4, -1.0])
    desirable = torch.tensor([True, True, False, False])
    value = kto_loss(policy, ref, desirable, torch.tensor(0.0), reduction="none")
    torch.testing.assert_close(value, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert bool(torch.isfinite(torch.autograd.grad(value.sum(), policy)[0]).all())
    with pytest.raises(ValueError, match="desirable must be a bool tensor"):
        kto_loss(policy, ref, desirable.long(), 0.0)
    with pytest.raises(ValueError, match="kl_baseline must be one number"):
        kto_loss(policy, ref, desirable, torch.zeros(2))
    with pytest.raises(ValueError, match="desirable_weight must be >= 0"):
        kto_loss(policy, ref, desirable, 0.0, desirable_weight=-1.0)


def test_kto_term_and_num_items():
    policy, ref, desirable, z0 = kto_batch()
    term = build_term({"name": "kto", "beta": 0.2, "undesirable_weight": 1.3})
    value = term(LossInputs(policy_logps=policy, ref_logps=ref, desirable=desirable, kl_baseline=z0))
    torch.testing.assert_close(value, kto_expected(policy, ref, desirable, z0, 0.2, 1.0, 1.3).mean())
    assert not term.batch_additive  # a per-batch mean (the baseline is a per-batch estimate)
    whole = kto_loss(policy, ref, desirable, z0)
    parts = [kto_loss(policy[s], ref[s], desirable[s], z0, num_items=6) for s in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(sum(parts), whole)
