"""Composite losses: named terms, each with a weight that is a number or a schedule.

A :class:`LossTerm` knows its label, its weight, the :class:`LossInputs` fields it needs and
how to compute its (unweighted, reduced) value from them. A :class:`CompositeLoss` evaluates
every term at the current step and returns the weighted total AND every term's value and
current weight, for logging. Terms are usually built from config dicts by
:mod:`losslab.losses.registry`; nothing here knows any loss by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from losslab.errors import UserError
from losslab.labels import IGNORE_INDEX
from losslab.losses.common import TeacherTopK
from losslab.losses.schedules import Weight, weight_at


@dataclass
class LossInputs:
    """Everything a loss term may read from one batch; every field is optional.

    Token level (causal LM), all aligned: predictions at position t are scored against
    ``labels[..., t]`` (shift labels by one before building this):
        logits (B, T, V); labels (B, T) with ``ignore_index`` where not trained;
        token_weights (B, T); num_items = global number of trained tokens (for ``mean``);
        num_sequences = global number of sequences with a trained token (``sequence`` reduction);
        num_pairs = global number of adjacent trained positions (the ``consistency`` term);
        hidden_states (B, T, D) the last hidden states (the LM head's input, also the features
        of the semantic terms); lm_head_weight (V, D) and lm_head_bias (V,) for the fused head
        (used when ``logits`` is None); attention_mask (B, T) 1 = real token, 0 = padding;
        context_mask (B, T) overrides the default context (attended, not trained).
    Sequence level (classification / regression heads):
        class_logits (N, C) or (N, K); class_targets (N,) class indices or (N, K) multi-label
        floats; predictions and targets (N,) or (N, K) regression values; target_mask
        broadcastable to the items, False = not trained; sample_weights (N,);
        num_examples = global number of trained items (for ``mean``).
    Pairwise: rewards_chosen, rewards_rejected (N,); margins (N,); anchor, positive (N, D) and
    negative (N, D) embeddings (InfoNCE uses anchor/positive as query/key and negative as
    extra negatives); positive_ids (N,), negative_ids (M,) integer ids of the texts behind them
    (equal = the same text: InfoNCE never takes a query's own text as its negative).
    Preference (policy log-probs summed over each completion's tokens, with gradient):
        chosen_logps, rejected_logps (B,) of the policy; ref_chosen_logps, ref_rejected_logps (B,)
        of the reference model (no gradient); chosen_lengths, rejected_lengths (B,) completion
        token counts. Unpaired (KTO): policy_logps, ref_logps (B,), desirable (B,) bool,
        kl_baseline () the batch's detached estimate of KL(policy || reference).
        monitor: name -> scalar tensor, batch statistics the trainer logs (not loss inputs).
    Distillation (aligned with ``labels`` as the student's ``logits``; no gradient):
        teacher_logits (B, T, V); or teacher_hidden_states (B, T, Dt) with teacher_lm_head_weight
        (V, Dt) (and teacher_lm_head_bias (V,)) for the fused heads; or teacher_topk, a :class:`~losslab.losses.common.TeacherTopK`
        of the teacher's top-k logits (B, T, k) and their vocabulary indices (from a cache).
    Regularisers: model (a module or name -> tensor mapping); reference_params (name -> tensor).
    """

    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    ignore_index: int = IGNORE_INDEX
    token_weights: torch.Tensor | None = None
    num_items: int | float | torch.Tensor | None = None
    num_sequences: int | float | torch.Tensor | None = None
    num_pairs: int | float | torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    lm_head_weight: torch.Tensor | None = None
    lm_head_bias: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    class_logits: torch.Tensor | None = None
    class_targets: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    target_mask: torch.Tensor | None = None
    sample_weights: torch.Tensor | None = None
    num_examples: int | float | torch.Tensor | None = None
    rewards_chosen: torch.Tensor | None = None
    rewards_rejected: torch.Tensor | None = None
    margins: torch.Tensor | None = None
    anchor: torch.Tensor | None = None
    positive: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    positive_ids: torch.Tensor | None = None
    negative_ids: torch.Tensor | None = None
    chosen_logps: torch.Tensor | None = None
    rejected_logps: torch.Tensor | None = None
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None
    policy_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    desirable: torch.Tensor | None = None
    kl_baseline: torch.Tensor | None = None
    monitor: dict[str, torch.Tensor] | None = None
    teacher_logits: torch.Tensor | None = None
    teacher_hidden_states: torch.Tensor | None = None
    teacher_lm_head_weight: torch.Tensor | None = None
    teacher_lm_head_bias: torch.Tensor | None = None
    teacher_topk: TeacherTopK | None = None
    model: nn.Module | Mapping[str, torch.Tensor] | None = None
    reference_params: Mapping[str, torch.Tensor] | None = None

    def present(self) -> set[str]:
        """The names of the fields that are set (not None)."""
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def trained_mask(self) -> torch.Tensor:
        """(B, T) True where ``labels`` is trained."""
        if self.labels is None:
            raise UserError("the batch has no labels")
        return self.labels != self.ignore_index

    def resolved_context_mask(self) -> torch.Tensor:
        """``context_mask`` if given, else attended (``attention_mask``, all if None) and not trained."""
        if self.context_mask is not None:
            return self.context_mask.to(torch.bool)
        context = ~self.trained_mask()
        if self.attention_mask is not None:
            context = context & self.attention_mask.to(torch.bool)
        return context


INPUT_FIELDS = tuple(f.name for f in dataclasses.fields(LossInputs))


@dataclass
class LossTerm:
    """One weighted term of a composite loss.

    ``requires``: alternative sets of :class:`LossInputs` fields; the term can be computed
    when every field of at least one set is present (e.g. logits, or hidden states and the
    LM head weight). ``compute`` returns the term's reduced, unweighted value (a scalar).
    """

    label: str
    name: str
    weight: Weight
    compute: Callable[[LossInputs], torch.Tensor]
    requires: tuple[frozenset[str], ...] = (frozenset(),)
    options: dict[str, Any] = field(default_factory=dict)
    batch_additive: bool = False
    """True when the term is a sum over batch items divided by a count the batch is given
    (``num_items``): its values over micro-batches and processes add up to the whole batch's.
    Other terms (per-batch means, regularisers) are scaled by ``per_batch_scale``."""
    count_field: str | None = None
    """A :class:`LossInputs` count this term divides by when the batch carries it (e.g.
    ``num_sequences`` for the ``sequence`` reduction): given, the term is batch additive too."""
    detail: str | None = None
    """Which variant of the loss this term is (e.g. ``loss_type sigmoid``), for messages."""

    def missing(self, present: set[str]) -> str | None:
        """None when ``present`` satisfies the term, else a sentence saying what it needs."""
        if any(needed <= present for needed in self.requires):
            return None
        alternatives = [" and ".join(sorted(needed - present)) for needed in self.requires]
        kind = f"{self.name}, {self.detail}" if self.detail else self.name
        return f"term {self.label!r} ({kind}) needs " + ", or ".join(alternatives)

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        problem = self.missing(inputs.present())
        if problem:
            raise UserError(f"{problem} in the loss inputs")
        return self.compute(inputs)


@dataclass
class CompositeOutput:
    """``total`` = sum of weight x value; ``values`` (unweighted, with their graphs) and
    ``weights`` (the weights at this step) by term label."""

    total: torch.Tensor
    values: dict[str, torch.Tensor]
    weights: dict[str, float]

    def log_dict(self, prefix: str = "loss") -> dict[str, float]:
        """Flat floats for a per-step log: ``loss``, ``loss/LABEL``, ``weight/LABEL``."""
        out = {prefix: float(self.total.detach())}
        out.update({f"{prefix}/{label}": float(v.detach()) for label, v in self.values.items()})
        out.update({f"weight/{label}": w for label, w in self.weights.items()})
        return out


class CompositeLoss:
    """``total(step) = sum_k weight_k(step) * term_k(inputs)``, with every part kept.

    A term whose weight is 0 at this step is still computed for logging, but without a
    graph, and it does not enter the total (so a NaN in an unused term cannot poison it).
    """

    def __init__(self, terms: Sequence[LossTerm]) -> None:
        if not terms:
            raise UserError("a composite loss needs at least one term")
        labels = [t.label for t in terms]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise UserError(
                f"loss term labels must be unique; repeated: {', '.join(repeated)} (set `label:` to tell them apart)"
            )
        self.terms = list(terms)

    def missing_inputs(self, present: set[str] | LossInputs) -> list[str]:
        """One sentence per term that the inputs (or the set of field names) cannot satisfy;
        a trainer calls this up front with the fields it will provide."""
        names = present.present() if isinstance(present, LossInputs) else set(present)
        return [problem for t in self.terms if (problem := t.missing(names))]

    def check_inputs(self, present: set[str] | LossInputs) -> None:
        """Raise :class:`UserError` listing every term whose inputs are missing."""
        problems = self.missing_inputs(present)
        if problems:
            raise UserError("; ".join(problems))

    def weights_at(self, step: int) -> dict[str, float]:
        return {t.label: weight_at(t.weight, step) for t in self.terms}

    def __call__(self, inputs: LossInputs, step: int = 0, per_batch_scale: float = 1.0) -> CompositeOutput:
        """Evaluate every term. ``per_batch_scale`` multiplies the terms that are not
        ``batch_additive``: a trainer that sums micro-batch losses over ``k`` accumulation steps
        and ``p`` processes passes ``1 / (k p)``, so such a term counts once per optimizer step,
        like the token losses normalised by the global ``num_items``. ``values`` are the terms'
        (scaled) shares of this call, so they add up over the micro-batches of a step."""
        self.check_inputs(inputs)
        weights = self.weights_at(step)
        values: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for term in self.terms:
            w = weights[term.label]
            additive = term.batch_additive or (
                term.count_field is not None and getattr(inputs, term.count_field) is not None
            )
            scale = 1.0 if additive else per_batch_scale
            if w == 0:
                with torch.no_grad():
                    values[term.label] = term(inputs) * scale
                continue
            values[term.label] = value = term(inputs) * scale
            total = w * value if total is None else total + w * value
        if total is None:  # every weight is 0 now: a zero that backward() accepts (and ignores)
            total = torch.zeros((), device=next(iter(values.values())).device, requires_grad=True)
        return CompositeOutput(total=total, values=values, weights=weights)
