"""Preference optimisation losses on per-sequence log-probs: the DPO family, reference-free
SimPO / CPO / ORPO, and KTO for unpaired data.

Inputs are the policy's log-probs of each completion summed over its tokens (B,) (chosen and
rejected per pair), the reference model's (no gradient), and the completions' token counts
where a loss averages over tokens. Each function computes one value per pair (per item for
KTO) and reduces it once: ``none`` (B,), ``sum``, or ``mean`` = sum / ``num_items`` when given
(the global number of pairs across micro-batches and processes, so micro-batches add up to the
whole batch) else / B (clamped to at least 1: an empty batch gives 0, never NaN).

The definitions are TRL's (``DPOTrainer`` for the 14 reference-based types and the
f-divergences, ``CPOTrainer`` for simpo and cpo, ``ORPOTrainer`` for orpo, ``KTOTrainer`` for
kto), so a configuration moved from TRL gives the same numbers; docs/losses.md has each formula
and its paper. Every sigmoid is taken in its ``logsigmoid`` / complement form, so margins of
any size give finite values and gradients. Inputs of any float dtype are computed in float32
(float64 stays float64).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, get_args

import torch
import torch.nn.functional as F
from annotated_types import Interval

from losslab.losses.common import (
    Count,
    NonNegative,
    Positive,
    check_choice,
    check_range,
    check_same_shape,
    compute_dtype,
)
from losslab.losses.reduction import check_reduction, reduce_loss

LossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "simpo",
    "cpo",
    "orpo",
]
Divergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
Smoothing = Annotated[float, Interval(ge=0, lt=1)]
UnitInterval = Annotated[float, Interval(ge=0, le=1)]

REFERENCE_FREE = frozenset({"simpo", "cpo", "orpo"})
"""Types that read no reference log-probs (and refuse them)."""
LENGTH_NORMALISED = frozenset({"ipo", "sigmoid_norm", "simpo", "orpo"})
"""Types that average log-probs over completion tokens (and need the lengths), as TRL does."""
SMOOTHED = frozenset({"robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo"})
"""Types that read ``label_smoothing``."""
DIVERGENCE_TYPES = frozenset(LOSS_TYPES) - REFERENCE_FREE - {"aot", "aot_unpaired", "apo_zero"}
"""Types whose log-ratios go through the f-divergence (TRL's ``chosen_scores``/``rejected_scores``);
aot, aot_unpaired and apo_zero read the plain log-ratios."""

EXP_CAP = 40.0
"""The largest exponent of the forward-KL and alpha-divergence scores: beyond it a score is
constant (zero gradient) instead of overflowing. TRL caps alpha-divergence's at 80 and
forward-KL's not at all; 40 (a policy/reference probability ratio of e^40 for one completion)
keeps even the squared losses (ipo, sppo_hard) finite in float32."""
_ALPHA_ONE = 1e-6  # |alpha - 1| below this is the reverse-KL limit, as in TRL


def uses_reference(loss_type: str) -> bool:
    """True when ``loss_type`` reads ``ref_chosen_logps`` and ``ref_rejected_logps``."""
    return loss_type not in REFERENCE_FREE


def uses_lengths(loss_type: str) -> bool:
    """True when ``loss_type`` reads ``chosen_lengths`` and ``rejected_lengths``."""
    return loss_type in LENGTH_NORMALISED


def check_preference_options(
    loss_type: str,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    divergence: str = "reverse_kl",
    divergence_alpha: float = 0.5,
) -> None:
    """``ValueError`` (``TypeError`` for a non-number) for a bad value, or for an option that
    ``loss_type`` would silently ignore (a config that says it trains something it does not)."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("divergence", divergence, DIVERGENCES)
    check_range("beta", beta, 0.0)
    if beta == 0:
        raise ValueError("beta must be > 0; got 0")
    check_range("label_smoothing", label_smoothing, 0.0, 1.0)
    check_range("discopop_tau", discopop_tau, 0.0)
    if discopop_tau == 0:
        raise ValueError("discopop_tau must be > 0; got 0")
    check_range("simpo_gamma", simpo_gamma, 0.0)
    check_range("divergence_alpha", divergence_alpha, 0.0, 1.0)
    if label_smoothing and loss_type not in SMOOTHED:
        raise ValueError(
            f"loss_type {loss_type} does not use label_smoothing (only {', '.join(sorted(SMOOTHED))} do); "
            f"got {label_smoothing}"
        )
    if loss_type == "robust" and label_smoothing >= 0.5:
        raise ValueError(f"robust needs label_smoothing < 0.5 (the label flip rate); got {label_smoothing}")
    if loss_type == "exo_pair" and not 0 < label_smoothing < 1:
        raise ValueError(
            f"exo_pair needs label_smoothing in (0, 1) (the paper's epsilon, e.g. 1e-3); got {label_smoothing}"
        )
    if loss_type in ("aot", "aot_unpaired", "simpo", "cpo") and label_smoothing > 0.5:
        raise ValueError(f"{loss_type} needs label_smoothing <= 0.5 (beyond it the labels flip); got {label_smoothing}")
    if divergence != "reverse_kl" and loss_type not in DIVERGENCE_TYPES:
        raise ValueError(
            f"loss_type {loss_type} does not use divergence (only {', '.join(sorted(DIVERGENCE_TYPES))} do); "
            f"got {divergence}"
        )
    if divergence_alpha != 0.5 and divergence != "alpha_divergence":
        raise ValueError(f"divergence_alpha is used only with divergence alpha_divergence; got {divergence}")
    if discopop_tau != 0.05 and loss_type != "discopop":
        raise ValueError(f"discopop_tau is used only by loss_type discopop; got {loss_type}")
    if simpo_gamma != 0.5 and loss_type != "simpo":
        raise ValueError(f"simpo_gamma is used only by loss_type simpo; got {loss_type}")


def divergence_scores(logratios: torch.Tensor, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """``f'(u)`` of the f-divergence at ``u = pi / pi_ref`` (log-ratios ``r`` = log u), up to a
    constant, as TRL's f-DPO scores: reverse_kl ``r``; forward_kl ``-exp(-r)``; js_divergence
    ``log sigmoid(r)``; alpha_divergence ``exp((alpha - 1) r) / (alpha - 1)`` (``r`` at alpha = 1).
    Exponents are capped at :data:`EXP_CAP`."""
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and abs(alpha - 1.0) < _ALPHA_ONE):
        return logratios
    if divergence == "forward_kl":
        return -torch.exp((-logratios).clamp(max=EXP_CAP))
    if divergence == "js_divergence":
        return F.logsigmoid(logratios)
    if divergence == "alpha_divergence":
        return torch.exp(((alpha - 1.0) * logratios).clamp(max=EXP_CAP)) / (alpha - 1.0)
    raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` (conservative labels)."""
    loss = -F.logsigmoid(z)
    if eps:
        loss = (1 - eps) * loss - eps * F.logsigmoid(-z)
    return loss


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-log 2``; ``x`` is capped at
    ``-eps`` of its dtype (a mean log-prob of exactly 0 would give ``-inf``)."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    far = x < -math.log(2)
    # each branch sees a safe argument, so the unused one cannot send NaN back
    near_x = torch.where(far, torch.full_like(x, -1.0), x)
    far_x = torch.where(far, x, torch.full_like(x, -1.0))
    return torch.where(far, torch.log1p(-torch.exp(far_x)), torch.log(-torch.expm1(near_x)))


def _per_token(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return logps / lengths.to(logps.dtype).clamp(min=1)


def _check_lengths(name: str, lengths: torch.Tensor | None, like: torch.Tensor, loss_type: str) -> torch.Tensor:
    if lengths is None:
        raise ValueError(f"loss_type {loss_type} averages over completion tokens: it needs {name}")
    if tuple(lengths.shape) != tuple(like.shape):
        raise ValueError(f"{name} {tuple(lengths.shape)} must have the log-probs' shape {tuple(like.shape)}")
    return lengths.to(like.device)


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_type: LossType = "sigmoid",
    beta: Positive = 0.1,
    label_smoothing: Smoothing = 0.0,
    discopop_tau: Positive = 0.05,
    simpo_gamma: NonNegative = 0.5,
    divergence: Divergence = "reverse_kl",
    divergence_alpha: UnitInterval = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """Pairwise preference loss of the policy (DPO and its variants, SimPO, CPO, ORPO).

    Shapes: every ``*_logps`` and ``*_lengths`` (B,). ``chosen_logps``/``rejected_logps``: the
    policy's log-probs summed over each completion's tokens; ``ref_*``: the reference model's
    (required by every type but simpo, cpo and orpo, which refuse them); ``*_lengths``: completion
    token counts (required by ipo, sigmoid_norm, simpo and orpo, which average log-probs over
    tokens as TRL does, and refused by the others).

    With ``r_c = chosen - ref_chosen``, ``r_r = rejected - ref_rejected``, ``s = f(r)`` the
    ``divergence`` scores (:func:`divergence_scores`; ``s = r`` for reverse_kl, the DPO default),
    ``d = s_c - s_r`` and ``z = beta * d``, per pair (``eps`` = ``label_smoothing``):

    - sigmoid ``-log sig(z)``; hinge ``max(0, 1 - z)``; sigmoid_norm ``-log sig(beta (s_c/L_c - s_r/L_r))``;
      ipo ``(s_c/L_c - s_r/L_r - 1/(2 beta))^2``;
    - exo_pair ``sig(z) (log sig(z) - log(1 - eps)) + sig(-z) (log sig(-z) - log eps)``;
    - nca_pair ``-log sig(beta s_c) - 0.5 log sig(-beta s_c) - 0.5 log sig(-beta s_r)``;
    - robust ``(-(1 - eps) log sig(z) + eps log sig(-z)) / (1 - 2 eps)``;
    - bco_pair ``-log sig(beta s_c) - log sig(-beta s_r)`` (no running reward mean: as TRL now);
    - sppo_hard ``(s_c - 1/(2 beta))^2 + (s_r + 1/(2 beta))^2``;
    - aot ``C(beta (sort(pi_c - pi_r) - sort(ref_c - ref_r)))``, aot_unpaired ``C(beta (sort(r_c) - sort(r_r)))``
      with ``C(x) = -(1 - eps) log sig(x) - eps log sig(-x)``, sorted over the batch;
    - apo_zero ``sig(-beta r_c) + sig(beta r_r)``; apo_down ``sig(beta r_c) + sig(-z)``;
    - discopop ``(1 - m) (-log sig(z)) + m exp(-z)``, ``m = sig(z / discopop_tau)``;
    - simpo ``C(beta (pi_c/L_c - pi_r/L_r) - simpo_gamma)``; cpo ``C(beta (pi_c - pi_r))``;
    - orpo ``-beta log sig(log odds(a_c) - log odds(a_r))``, ``a = pi / L``, ``odds(a) = e^a / (1 - e^a)``.

    Returns (B,) for ``reduction="none"``, else a scalar: ``sum``, or ``mean`` = sum /
    ``num_items`` (default B). Bad options or inputs raise ``ValueError``.
    """
    check_preference_options(
        loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        simpo_gamma=simpo_gamma,
        divergence=divergence,
        divergence_alpha=divergence_alpha,
    )
    check_reduction(reduction)
    check_same_shape(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    if chosen_logps.ndim != 1:
        raise ValueError(f"log-probs must be (B,), one per pair; got shape {tuple(chosen_logps.shape)}")
    refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    given_refs = [name for name, t in refs.items() if t is not None]
    lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    given_lengths = [name for name, t in lengths.items() if t is not None]
    if not uses_reference(loss_type) and given_refs:
        raise ValueError(f"loss_type {loss_type} is reference-free: it takes no {' or '.join(given_refs)}")
    if not uses_lengths(loss_type) and given_lengths:
        raise ValueError(
            f"loss_type {loss_type} uses summed log-probs: it takes no {' or '.join(given_lengths)} "
            f"(the length-averaged types are {', '.join(sorted(LENGTH_NORMALISED))})"
        )
    dtype = compute_dtype(chosen_logps)
    pi_c, pi_r = chosen_logps.to(dtype), rejected_logps.to(dtype)
    eps = label_smoothing

    if not uses_reference(loss_type):
        if loss_type == "cpo":
            per_pair = _smoothed_sigmoid(beta * (pi_c - pi_r), eps)
        else:
            a_c = _per_token(pi_c, _check_lengths("chosen_lengths", chosen_lengths, pi_c, loss_type))
            a_r = _per_token(pi_r, _check_lengths("rejected_lengths", rejected_lengths, pi_r, loss_type))
            if loss_type == "simpo":
                per_pair = _smoothed_sigmoid(beta * (a_c - a_r) - simpo_gamma, eps)
            else:  # orpo
                log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
                per_pair = -beta * F.logsigmoid(log_odds)
        return reduce_loss(per_pair, None, reduction, num_items)

    if ref_chosen_logps is None or ref_rejected_logps is None:
        missing = " and ".join(name for name in refs if name not in given_refs)
        raise ValueError(f"loss_type {loss_type} compares with a reference model: it needs {missing}")
    check_same_shape(
        chosen_logps=chosen_logps, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps
    )
    ref_c, ref_r = ref_chosen_logps.to(dtype), ref_rejected_logps.to(dtype)
    r_c, r_r = pi_c - ref_c, pi_r - ref_r
    s_c = divergence_scores(r_c, divergence, divergence_alpha)
    s_r = divergence_scores(r_r, divergence, divergence_alpha)
    z = beta * (s_c - s_r)

    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(z)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - z)
    elif loss_type in ("ipo", "sigmoid_norm"):
        d = _per_token(s_c, _check_lengths("chosen_lengths", chosen_lengths, s_c, loss_type)) - _per_token(
            s_r, _check_lengths("rejected_lengths", rejected_lengths, s_r, loss_type)
        )
        per_pair = (d - 1 / (2 * beta)).square() if loss_type == "ipo" else -F.logsigmoid(beta * d)
    elif loss_type == "exo_pair":
        log_q_win, log_q_lose = F.logsigmoid(z), F.logsigmoid(-z)
        per_pair = torch.exp(log_q_win) * (log_q_win - math.log1p(-eps)) + torch.exp(log_q_lose) * (
            log_q_lose - math.log(eps)
        )
    elif loss_type == "nca_pair":
        per_pair = -F.logsigmoid(beta * s_c) - 0.5 * F.logsigmoid(-beta * s_c) - 0.5 * F.logsigmoid(-beta * s_r)
    elif loss_type == "robust":
        per_pair = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        per_pair = -F.logsigmoid(beta * s_c) - F.logsigmoid(-beta * s_r)
    elif loss_type == "sppo_hard":
        per_pair = (s_c - 0.5 / beta).square() + (s_r + 0.5 / beta).square()
    elif loss_type == "aot":
        delta = torch.sort(pi_c - pi_r).values - torch.sort(ref_c - ref_r).values
        per_pair = _smoothed_sigmoid(beta * delta, eps)
    elif loss_type == "aot_unpaired":
        per_pair = _smoothed_sigmoid(beta * (torch.sort(r_c).values - torch.sort(r_r).values), eps)
    elif loss_type == "apo_zero":
        per_pair = torch.sigmoid(-beta * r_c) + torch.sigmoid(beta * r_r)
    elif loss_type == "apo_down":
        per_pair = torch.sigmoid(beta * r_c) + torch.sigmoid(-z)
    else:  # discopop
        # m * exp(-z) as exp(-z + log m): finite for any z (exp(-z) alone overflows for z << 0)
        per_pair = -F.logsigmoid(z) * torch.sigmoid(-z / discopop_tau) + torch.exp(-z + F.logsigmoid(z / discopop_tau))
    return reduce_loss(per_pair, None, reduction, num_items)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_baseline: torch.Tensor | float,
    *,
    beta: Positive = 0.1,
    desirable_weight: NonNegative = 1.0,
    undesirable_weight: NonNegative = 1.0,
    reduction: str = "mean",
    num_items: Count = None,
) -> torch.Tensor:
    """KTO (Kahneman-Tversky optimisation) loss for unpaired completions.

    Shapes: ``policy_logps``, ``ref_logps`` (B,) summed completion log-probs of the policy and
    the reference; ``desirable`` (B,) bool; ``kl_baseline`` () the batch's estimate of
    KL(policy || reference) (detached here; TRL's is the mean log-ratio of mismatched
    prompt/completion pairs, clamped at 0 — the caller computes it).
    With ``r = policy - ref``, ``z0`` = ``kl_baseline``, per item:
    desirable ``desirable_weight * (1 - sig(beta (r - z0)))``, undesirable
    ``undesirable_weight * (1 - sig(beta (z0 - r)))``.
    Returns (B,) for ``reduction="none"``, else ``sum`` or ``mean`` = sum / ``num_items``
    (default B: the mean of the weighted losses over all items, as TRL's ``KTOTrainer``).
    """
    check_range("beta", beta, 0.0)
    if beta == 0:
        raise ValueError("beta must be > 0; got 0")
    check_range("desirable_weight", desirable_weight, 0.0)
    check_range("undesirable_weight", undesirable_weight, 0.0)
    check_reduction(reduction)
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if policy_logps.ndim != 1:
        raise ValueError(f"log-probs must be (B,), one per item; got shape {tuple(policy_logps.shape)}")
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor; got dtype {desirable.dtype}")
    dtype = compute_dtype(policy_logps)
    r = policy_logps.to(dtype) - ref_logps.to(dtype)
    z0 = torch.as_tensor(kl_baseline, device=r.device).detach().to(dtype)
    if z0.numel() != 1:
        raise ValueError(f"kl_baseline must be one number; got shape {tuple(z0.shape)}")
    z0 = z0.reshape(())
    # 1 - sig(x) = sig(-x)
    per_item = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(-beta * (r - z0)),
        undesirable_weight * torch.sigmoid(-beta * (z0 - r)),
    )
    return reduce_loss(per_item, None, reduction, num_items)
