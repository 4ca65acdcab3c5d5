"""The loss registry: config name -> how to build that loss as a term of a composite loss.

A term's config is ``{name: ..., weight: number | {schedule: ...}, label: ..., **options}``.
An entry's options are the keyword-only parameters of its pure loss function that do not
come from the batch (their names, defaults, types and bounds are read from the function's
signature), plus any ``extra_options``. Everything is checked when the term is BUILT:
an unknown name, an unknown option or a bad value raises :class:`UserError` naming what is
allowed. ``docs/losses.md`` documents every entry (a test keeps them in sync).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from annotated_types import Ge
from pydantic import ConfigDict, TypeAdapter, ValidationError

from losslab.errors import UserError
from losslab.losses.common import config_value
from losslab.losses.composite import CompositeLoss, LossInputs, LossTerm
from losslab.losses.dialogue import consistency_loss, semantic_alignment_loss, semantic_l2_loss
from losslab.losses.distillation import check_distillation_options, distillation_loss
from losslab.losses.pairwise import bradley_terry_loss, info_nce_loss, margin_ranking_loss, triplet_loss
from losslab.losses.preference import check_preference_options, kto_loss, preference_loss, uses_lengths, uses_reference
from losslab.losses.regularizers import l2_penalty, l2_sp_penalty
from losslab.losses.schedules import build_weight
from losslab.losses.sequence import (
    binary_cross_entropy,
    binary_focal_loss,
    classification_cross_entropy,
    focal_loss,
    huber_loss,
    mse_loss,
    multiclass_hinge_loss,
)
from losslab.losses.token import check_token_options, token_cross_entropy

RESERVED_KEYS = ("name", "weight", "label")
_BATCH_ONLY = frozenset({"num_items"})  # a count that only the batch can know, never a config option
# allow_inf_nan=False: NaN passes pydantic's ge/le bounds, and an inf option (a huber delta,
# a temperature) gives NaN gradients
_TYPES = ConfigDict(arbitrary_types_allowed=True, strict=True, allow_inf_nan=False)


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    validator: TypeAdapter[Any]


@dataclass(frozen=True)
class TermSpec:
    """How to build one registry entry.

    ``fn``: the pure loss. ``inputs``: its argument -> the :class:`LossInputs` field (or
    zero-argument method) that supplies it; a trailing ``?`` marks an optional field, passed
    only when set. ``requires``: alternative sets of fields (default: the non-optional
    ``inputs``), or a function of the (validated) options that returns them, for an entry
    whose fields depend on its options. ``describe``: a function of the options that says
    which variant a term is (e.g. ``loss_type sigmoid``), for the messages about missing
    fields. ``reductions``: those a config may choose. ``compute``: replaces the plain
    call ``fn(**inputs, **options)`` when an entry needs more. ``extra_options``: name ->
    (type, default) for options the ``compute`` takes besides ``fn``'s.
    ``check``: extra validation of the options dict (raise ValueError).
    """

    fn: Callable[..., torch.Tensor]
    inputs: Mapping[str, str]
    reductions: tuple[str, ...] = ("mean", "sum")
    requires: tuple[frozenset[str], ...] | Callable[[dict[str, Any]], tuple[frozenset[str], ...]] | None = None
    compute: Callable[[LossInputs, dict[str, Any]], torch.Tensor] | None = None
    extra_options: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] | None = None
    describe: Callable[[dict[str, Any]], str] | None = None
    count: str | None = None
    """The :class:`LossInputs` count a ``mean`` divides by when the batch carries it (the
    trainer's count over the step), else the term is a per-batch mean: ``num_items`` of an
    entry without it is the batch's ``num_items``/``num_examples`` (always given in training)."""

    def options(self) -> dict[str, Option]:
        """Every config option of this entry with its default and validator, by name."""
        hints = typing.get_type_hints(self.fn, include_extras=True)
        found = {
            name: Option(name, p.default, TypeAdapter(hints[name], config=_TYPES))
            for name, p in inspect.signature(self.fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in self.inputs and name not in _BATCH_ONLY
        }
        for name, (hint, default) in self.extra_options.items():
            found[name] = Option(name, default, TypeAdapter(hint, config=_TYPES))
        return found

    def required_inputs(self, options: dict[str, Any] | None = None) -> tuple[frozenset[str], ...]:
        """The alternative sets of fields a term with ``options`` (default: the defaults) needs."""
        if callable(self.requires):
            if options is None:
                options = {key: opt.default for key, opt in self.options().items()}
            return self.requires(options)
        if self.requires is not None:
            return self.requires
        return (frozenset(f for f in self.inputs.values() if not f.endswith("?") and f != "ignore_index"),)

    def bind(self, inputs: LossInputs) -> dict[str, Any]:
        """The arguments of ``fn`` that come from the batch."""
        bound = {}
        for arg, source in self.inputs.items():
            name = source.rstrip("?")
            value = getattr(inputs, name)
            if inspect.isfunction(getattr(LossInputs, name, None)):
                value = value()  # a derived input, e.g. LossInputs.trained_mask
            if value is not None or not source.endswith("?"):
                bound[arg] = value
        return bound

    def __call__(self, inputs: LossInputs, options: dict[str, Any]) -> torch.Tensor:
        if self.compute is not None:
            return self.compute(inputs, options)
        return self.fn(**self.bind(inputs), **options)


def _token_cross_entropy(inputs: LossInputs, options: dict[str, Any]) -> torch.Tensor:
    """Token CE from ``logits``, or through the fused LM head from ``hidden_states`` and
    ``lm_head_weight`` when ``logits`` is None (never materialising the logits)."""
    options = dict(options)
    chunk_size = options.pop("chunk_size")
    reduction = options.pop("reduction")
    count = inputs.num_sequences if reduction == "sequence" else inputs.num_items
    labels = inputs.labels
    assert labels is not None
    kwargs = dict(ignore_index=inputs.ignore_index, token_weights=inputs.token_weights, **options)
    if inputs.logits is not None:
        return token_cross_entropy(inputs.logits, labels, reduction=reduction, num_items=count, **kwargs)
    from losslab.losses.fused import fused_linear_cross_entropy

    hidden, weight = inputs.hidden_states, inputs.lm_head_weight
    assert hidden is not None and weight is not None
    # (B, T, D) hidden with (B, T) labels: the fused head takes any leading shape, so the
    # ``sequence`` reduction sees the same sequences as with logits
    return fused_linear_cross_entropy(
        hidden,
        weight,
        labels,
        bias=inputs.lm_head_bias,
        chunk_size=chunk_size,
        reduction=reduction,
        num_items=count,
        **kwargs,
    )


def _check_token_options(options: dict[str, Any]) -> None:
    check_token_options(options["label_smoothing"], options["z_loss"], options["focal_gamma"], options["dft"])


def _distillation(inputs: LossInputs, options: dict[str, Any]) -> torch.Tensor:
    """Distillation from the student's ``logits`` and the teacher's ``teacher_logits`` or
    ``teacher_topk``; or, when ``logits`` is None, through both fused LM heads from
    ``hidden_states`` / ``lm_head_weight`` (and ``lm_head_bias``) and the teacher's
    ``teacher_hidden_states`` / ``teacher_lm_head_weight`` (and ``teacher_lm_head_bias``), or
    ``teacher_topk``."""
    options = dict(options)
    chunk_size = options.pop("chunk_size")
    kwargs = dict(labels=inputs.labels, ignore_index=inputs.ignore_index, num_items=inputs.num_items, **options)
    # a full teacher wins over a cached top-k when the batch carries both (top_k then applies to it)
    full_teacher = inputs.teacher_logits is not None or inputs.teacher_hidden_states is not None
    topk = None if full_teacher else inputs.teacher_topk
    if inputs.logits is not None and (inputs.teacher_logits is not None or topk is not None):
        return distillation_loss(inputs.logits, inputs.teacher_logits, teacher_topk=topk, **kwargs)
    from losslab.losses.fused_distillation import fused_linear_distillation

    hidden, weight = inputs.hidden_states, inputs.lm_head_weight
    assert hidden is not None and weight is not None
    return fused_linear_distillation(
        hidden,
        weight,
        inputs.teacher_hidden_states if topk is None else None,
        inputs.teacher_lm_head_weight if topk is None else None,
        teacher_topk=topk,
        student_bias=inputs.lm_head_bias,
        teacher_bias=inputs.teacher_lm_head_bias if topk is None else None,
        chunk_size=chunk_size,
        **kwargs,
    )


def _check_distillation_options(options: dict[str, Any]) -> None:
    check_distillation_options(options["divergence"], options["beta"], options["temperature"], options["top_k"])


_STUDENT = (frozenset({"logits"}), frozenset({"hidden_states", "lm_head_weight"}))
_TEACHER = (
    frozenset({"teacher_logits"}),
    frozenset({"teacher_hidden_states", "teacher_lm_head_weight"}),
    frozenset({"teacher_topk"}),
)
# logits with teacher_logits or teacher_topk; hidden states with the teacher's or teacher_topk
_DISTILLATION_REQUIRES = tuple(
    frozenset({"labels"}) | student | teacher
    for student in _STUDENT
    for teacher in _TEACHER
    if not ("logits" in student and "teacher_hidden_states" in teacher)
)


def _preference_requires(options: dict[str, Any]) -> tuple[frozenset[str], ...]:
    """The policy's log-probs, plus the reference's and the lengths where the loss_type reads them."""
    loss_type = options["loss_type"]
    fields = {"chosen_logps", "rejected_logps"}
    if uses_reference(loss_type):
        fields |= {"ref_chosen_logps", "ref_rejected_logps"}
    if uses_lengths(loss_type):
        fields |= {"chosen_lengths", "rejected_lengths"}
    return (frozenset(fields),)


def _preference(inputs: LossInputs, options: dict[str, Any]) -> torch.Tensor:
    """``preference_loss`` on the batch's log-probs: the reference log-probs and the lengths are
    passed only to the loss types that read them (a batch may carry both for every type), and
    ``mean`` divides by ``num_sequences`` (the pairs of the whole step) when the batch has it."""
    loss_type = options["loss_type"]
    chosen, rejected = inputs.chosen_logps, inputs.rejected_logps
    assert chosen is not None and rejected is not None  # checked by LossTerm against _preference_requires
    reference = uses_reference(loss_type)
    lengths = uses_lengths(loss_type)
    return preference_loss(
        chosen,
        rejected,
        inputs.ref_chosen_logps if reference else None,
        inputs.ref_rejected_logps if reference else None,
        chosen_lengths=inputs.chosen_lengths if lengths else None,
        rejected_lengths=inputs.rejected_lengths if lengths else None,
        num_items=inputs.num_sequences,
        **options,
    )


def _check_preference_options(options: dict[str, Any]) -> None:
    check_preference_options(**{k: v for k, v in options.items() if k != "reduction"})


_CLASSIFICATION = {
    "logits": "class_logits",
    "targets": "class_targets",
    "ignore_index": "ignore_index",
    "weights": "sample_weights?",
    "num_items": "num_examples?",
}
_ITEMS = {"mask": "target_mask?", "weights": "sample_weights?", "num_items": "num_examples?"}
_CONTEXT = (frozenset({"hidden_states", "labels"}), frozenset({"hidden_states", "context_mask"}))

# Which LossInputs field feeds which argument. Options are the rest of each function's
# keyword-only arguments; docs/losses.md has the formula and options of every entry.
LOSSES: dict[str, TermSpec] = {
    "token_cross_entropy": TermSpec(
        token_cross_entropy,
        {
            "logits": "logits",
            "labels": "labels",
            "ignore_index": "ignore_index",
            "token_weights": "token_weights?",
            "num_items": "num_items?",
        },
        reductions=("mean", "sum", "sequence"),
        requires=(frozenset({"labels", "logits"}), frozenset({"labels", "hidden_states", "lm_head_weight"})),
        compute=_token_cross_entropy,
        extra_options={"chunk_size": (Annotated[int, Ge(1)] | None, None)},
        check=_check_token_options,
    ),
    "cross_entropy": TermSpec(classification_cross_entropy, _CLASSIFICATION),
    "focal": TermSpec(focal_loss, _CLASSIFICATION),
    "multiclass_hinge": TermSpec(multiclass_hinge_loss, _CLASSIFICATION),
    "binary_cross_entropy": TermSpec(
        binary_cross_entropy, {"logits": "class_logits", "targets": "class_targets", **_ITEMS}
    ),
    "binary_focal": TermSpec(binary_focal_loss, {"logits": "class_logits", "targets": "class_targets", **_ITEMS}),
    "mse": TermSpec(mse_loss, {"predictions": "predictions", "targets": "targets", **_ITEMS}),
    "huber": TermSpec(huber_loss, {"predictions": "predictions", "targets": "targets", **_ITEMS}),
    "bradley_terry": TermSpec(
        bradley_terry_loss,
        {"rewards_chosen": "rewards_chosen", "rewards_rejected": "rewards_rejected", "margin": "margins?", **_ITEMS},
    ),
    "margin_ranking": TermSpec(
        margin_ranking_loss, {"scores_1": "rewards_chosen", "scores_2": "rewards_rejected", **_ITEMS}
    ),
    "triplet": TermSpec(triplet_loss, {"anchor": "anchor", "positive": "positive", "negative": "negative", **_ITEMS}),
    "info_nce": TermSpec(
        info_nce_loss,
        {
            "queries": "anchor",
            "keys": "positive",
            "negatives": "negative?",
            "key_ids": "positive_ids?",
            "negative_ids": "negative_ids?",
            **_ITEMS,
        },
    ),
    "preference": TermSpec(
        preference_loss,
        {
            "chosen_logps": "chosen_logps",
            "rejected_logps": "rejected_logps",
            "ref_chosen_logps": "ref_chosen_logps?",
            "ref_rejected_logps": "ref_rejected_logps?",
            "chosen_lengths": "chosen_lengths?",
            "rejected_lengths": "rejected_lengths?",
            "num_items": "num_sequences?",
        },
        requires=_preference_requires,
        compute=_preference,
        check=_check_preference_options,
        describe=lambda options: f"loss_type {options['loss_type']}",
    ),
    "kto": TermSpec(
        kto_loss,
        {
            "policy_logps": "policy_logps",
            "ref_logps": "ref_logps",
            "desirable": "desirable",
            "kl_baseline": "kl_baseline",
        },
    ),
    "distillation": TermSpec(
        distillation_loss,
        {
            "student_logits": "logits",
            "teacher_logits": "teacher_logits?",
            "labels": "labels",
            "teacher_topk": "teacher_topk?",
            "ignore_index": "ignore_index",
            "num_items": "num_items?",
        },
        requires=_DISTILLATION_REQUIRES,
        compute=_distillation,
        extra_options={"chunk_size": (Annotated[int, Ge(1)] | None, None)},
        check=_check_distillation_options,
        describe=lambda options: f"divergence {options['divergence']}",
    ),
    "consistency": TermSpec(
        consistency_loss,
        {"logits": "logits", "mask": "trained_mask", "num_items": "num_pairs?"},
        requires=(frozenset({"logits", "labels"}),),
        count="num_pairs",
    ),
    "semantic_l2": TermSpec(
        semantic_l2_loss, {"features": "hidden_states", "context_mask": "resolved_context_mask"}, requires=_CONTEXT
    ),
    "semantic_alignment": TermSpec(
        semantic_alignment_loss,
        {"features": "hidden_states", "context_mask": "resolved_context_mask", "response_mask": "trained_mask"},
        requires=(frozenset({"hidden_states", "labels"}),),
    ),
    "l2": TermSpec(l2_penalty, {"params": "model"}, reductions=("sum", "mean")),
    "l2_sp": TermSpec(l2_sp_penalty, {"params": "model", "reference": "reference_params"}, reductions=("sum", "mean")),
}


def _validation_message(exc: ValidationError) -> str:
    messages = []
    for error in exc.errors():
        loc = "".join(f"[{part}]" for part in error["loc"] if isinstance(part, int))
        text = f"{loc} {error['msg']}".strip()
        if text not in messages:
            messages.append(text)
    return "; or ".join(messages)


def build_term(config: Mapping[str, Any], *, total_steps: int | None = None, where: str | None = None) -> LossTerm:
    """A :class:`LossTerm` from ``{name, weight = 1.0, label = name, **options}``.

    ``total_steps`` completes weight schedules that leave it out. Raises :class:`UserError`
    (listing what is allowed) for an unknown name, option, reduction or a bad value.
    """
    if not isinstance(config, Mapping):
        raise UserError(f"a loss term must be a mapping {{name: ..., weight: ...}}; got {config!r}", where=where)
    name = config.get("name")
    if not isinstance(name, str) or name not in LOSSES:  # (a mapping as name is unhashable)
        raise UserError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)}", where=where)
    spec = LOSSES[name]
    allowed = spec.options()
    given = {k: v for k, v in config.items() if k not in RESERVED_KEYS}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise UserError(
            f"loss {name!r}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join([*RESERVED_KEYS, *allowed])}",
            where=where,
        )
    options = {key: opt.default for key, opt in allowed.items()}
    for key, value in given.items():
        try:
            options[key] = allowed[key].validator.validate_python(config_value(value))
        except ValidationError as exc:
            raise UserError(f"loss {name!r}: option {key}={value!r}: {_validation_message(exc)}", where=where) from None
    if options.get("reduction") not in spec.reductions:
        raise UserError(
            f"loss {name!r}: reduction must be one of {', '.join(spec.reductions)}; got {options.get('reduction')!r}",
            where=where,
        )
    if spec.check is not None:
        try:
            spec.check(options)
        except (TypeError, ValueError) as exc:
            raise UserError(f"loss {name!r}: {exc}", where=where) from None
    label = config.get("label", name)
    if not isinstance(label, str) or not label:
        raise UserError(f"loss {name!r}: label must be a non-empty string; got {label!r}", where=where)
    weight = build_weight(config.get("weight", 1.0), total_steps=total_steps, where=f"{where or name}: weight")
    reduction = options.get("reduction")
    counted = "num_items" in spec.inputs and (reduction == "sum" or (reduction == "mean" and spec.count is None))
    count_field = spec.count if reduction == "mean" else "num_sequences" if reduction == "sequence" else None
    return LossTerm(
        label=label,
        name=name,
        weight=weight,
        compute=lambda inputs: spec(inputs, options),
        requires=spec.required_inputs(options),
        options=options,
        detail=spec.describe(options) if spec.describe is not None else None,
        batch_additive=counted,
        count_field=count_field,  # given in the batch, the term is batch additive (read by the term's inputs)
    )


def build_composite(
    configs: Sequence[Mapping[str, Any]],
    *,
    total_steps: int | None = None,
    where: str | Callable[[int], str] = "loss.terms",
) -> CompositeLoss:
    """A :class:`CompositeLoss` from a list of term configs (``loss.terms`` in a config file).
    ``where``: the place errors name, ``where[i]`` for the i-th term, or a function of ``i``
    that gives the i-th term's place (a config file's line)."""
    term_where = where if callable(where) else (lambda i: f"{where}[{i}]")
    if isinstance(configs, (str, Mapping)) or not isinstance(configs, Sequence):
        raise UserError(
            f"expected a list of loss terms; got {configs!r}", where=where if isinstance(where, str) else None
        )
    terms = [build_term(c, total_steps=total_steps, where=term_where(i)) for i, c in enumerate(configs)]
    try:
        return CompositeLoss(terms)
    except UserError as exc:  # no term, or a repeated label: the place is the whole list
        raise UserError(str(exc), where=where if isinstance(where, str) else None) from None
