"""``preference``: preference optimisation of a causal LM (DPO and its family, reference-free
SimPO / CPO / ORPO, KTO on unpaired data, SFT on the chosen replies), through the one adapter.

What the model reads (docs/training.md#preference): paired records ``{prompt | messages, chosen,
rejected}`` or unpaired ``{prompt | messages, completion, desirable}`` under the chat template
(:mod:`losslab.train.tasks.preference_data`). One forward per batch on the pair layout of
``preference.layout`` (:mod:`losslab.train.tasks.pair_rows`), with the fused head: the hidden
states of the scored positions go through :func:`~losslab.losses.fused_sequence_logps`, never
the logits. Loss inputs: ``chosen_logps``/``rejected_logps`` and their lengths (paired),
``policy_logps``/``desirable`` (unpaired), the reference's log-probs (``preference.reference``),
KTO's ``kl_baseline``, and the chosen replies' next-token ``labels`` with ``hidden_states`` for a
``token_cross_entropy`` term (SFT, or the NLL part of ORPO / CPO / RPO).


Every step logs the monitor values (rewards, reward accuracy, margin, log-probs); evaluation
gives reward accuracy and margin on held-out pairs and, with ``eval.generate``, sampled replies
to held-out prompts scored by VADER (``reward``) with their sequence KL to the reference (``kl``).

This module is the task's interface (``loss_needs``, ``metric_names``, ``build``) and its
records; the batches and the forward are in :mod:`~losslab.train.tasks.preference_forward`, the
reference model and its cache in :mod:`~losslab.train.tasks.preference_reference`, the
evaluation in :mod:`~losslab.train.tasks.preference_eval`.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from pydantic import field_validator

from losslab.data.builtin import resolve_data_path
from losslab.data.records import Source, iter_raw_records, load_records
from losslab.data.schemas import PreferenceRecord, UnpairedPreferenceRecord
from losslab.errors import UserError
from losslab.losses.registry import build_composite
from losslab.models import load_causal_lm, load_tokenizer
from losslab.train.config import TrainConfig
from losslab.train.task import REGULARISER_FIELDS, LossNeeds, LossPlan, TaskRun
from losslab.train.tasks.preference_data import (
    PreferenceEncoder,
    SkipRecord,
    add_mismatched,
    encode_pair,
    encode_unpaired,
    unpair,
)
from losslab.train.tasks.preference_eval import GENERATION_METRICS, METRICS, Evaluator
from losslab.train.tasks.preference_forward import (
    CROSS_ENTROPY,
    PAIRED,
    PAIRED_REFERENCE,
    UNPAIRED,
    UNPAIRED_REFERENCE,
    PreferenceCollator,
    PreferenceForward,
    output_embeddings,
)
from losslab.train.tasks.preference_reference import (
    cache_reference,
    load_reference,
    reference_columns,
    reference_name,
    resolved_reference,
)
from losslab.train.tasks.records import SplitRecords, sample_limit, skipped_records

DEFAULT_TERMS = ({"name": "preference", "loss_type": "sigmoid", "beta": 0.1},)
DEFAULT_UNPAIRED_TERMS = ({"name": "kto", "beta": 0.1},)


# ---- the loss plan: what the batches provide ------------------------------------------------------


def unpaired_data(config: TrainConfig) -> bool:
    """Whether the training records are unpaired (``completion``/``desirable``): the first record says."""
    try:
        path = resolve_data_path(config.data.train, "train")
        for _, raw in iter_raw_records(path):
            if isinstance(raw, dict):
                return "completion" in raw or "desirable" in raw
    except (UserError, OSError):
        return False  # the data's own check reports it
    return False


def unpaired_batches(config: TrainConfig) -> bool:
    """KTO trains on unpaired items: with a ``kto`` term, or by default on unpaired records."""
    if config.loss.terms is None:
        return unpaired_data(config)
    return any(isinstance(t, dict) and t.get("name") == "kto" for t in config.loss.terms)


def reference_mode(config: TrainConfig) -> str:
    """``preference.reference`` resolved: ``auto`` is ``cache`` when a term needs the reference's
    log-probs, else ``none`` (read from the terms' requirements in the loss registry)."""
    mode = config.preference.reference
    if mode != "auto":
        return mode
    unpaired = unpaired_batches(config)
    base, reference = batch_fields(unpaired, with_reference=False), batch_fields(unpaired, with_reference=True)
    terms = config.loss.terms if config.loss.terms is not None else default_terms(config)
    try:
        composite = build_composite([dict(t) for t in terms])
    except UserError:
        return "none"  # plan_loss reports the bad term
    without = composite.missing_inputs(set(base) | REGULARISER_FIELDS)
    with_ref = composite.missing_inputs(set(reference) | REGULARISER_FIELDS)
    return "cache" if len(with_ref) < len(without) else "none"


def batch_fields(unpaired: bool, *, with_reference: bool) -> frozenset[str]:
    """The :class:`LossInputs` fields a batch fills."""
    if unpaired:
        return UNPAIRED | (UNPAIRED_REFERENCE if with_reference else frozenset())
    return PAIRED | CROSS_ENTROPY | (PAIRED_REFERENCE if with_reference else frozenset())


def default_terms(config: TrainConfig) -> tuple[dict[str, Any], ...]:
    return DEFAULT_UNPAIRED_TERMS if unpaired_data(config) else DEFAULT_TERMS


def loss_needs(config: TrainConfig) -> LossNeeds:
    mode = reference_mode(config)
    provides = batch_fields(unpaired_batches(config), with_reference=mode in ("model", "cache"))
    label = "preference" if config.preference.reference != "none" else "preference (preference.reference: none)"
    return LossNeeds(label, default_terms(config), provides)


def metric_names(config: TrainConfig) -> set[str]:
    """The names ``split/metric`` that the evaluation gives for each split of ``eval.splits``
    (checked against a real evaluation by tests/train/test_metric_names.py)."""
    names = list(METRICS) + (list(GENERATION_METRICS) if config.eval.generate else [])
    return {f"{split}/{name}" for split in config.eval.splits for name in names}


# ---- records ------------------------------------------------------------------------------------------


class _PairRecord(PreferenceRecord):
    """A paired record whose chosen text may equal its rejected one: the task counts and skips
    such pairs itself (listed with file:line), whatever ``data.on_error`` says."""

    @field_validator("rejected")
    @classmethod
    def _different(cls, rejected: str, info: object) -> str:
        return rejected


def read_preference_split(
    config: TrainConfig, split: str, encoder: PreferenceEncoder, unpaired: bool
) -> tuple[list[dict[str, Any]], SplitRecords] | None:
    """The encoded features of one split (None when the config names no file for it). Bad
    records raise or are skipped per ``data.on_error``; pairs with nothing to prefer are always
    skipped; both are counted in the split's skip log (``file:line: reason``)."""
    from losslab.data.records import SkipLog

    spec = getattr(config.data, split)
    if spec is None:
        return None
    path = resolve_data_path(spec, split)
    skipped = SkipLog()
    schema = UnpairedPreferenceRecord if unpaired else _PairRecord
    sources: list[Source] = []
    features: list[dict[str, Any]] = []
    limit = sample_limit(config, split)
    for source, record in load_records(path, schema, on_error=config.data.on_error, skipped=skipped):
        if limit is not None and len(features) >= limit:
            break
        try:
            feature = (
                encode_unpaired(encoder, source, cast(UnpairedPreferenceRecord, record))
                if unpaired
                else encode_pair(encoder, source, cast(PreferenceRecord, record))
            )
        except SkipRecord as exc:
            skipped.add(f"{source}: {exc}")
            continue
        except UserError as exc:
            if config.data.on_error == "raise":  # the record's file:line, whatever raised it
                raise UserError(exc.message, where=exc.where or str(source)) from None
            skipped.add(f"{source}: {exc.message}")
            continue
        sources.append(source)
        features.append(feature)
    if not features:
        raise UserError(f"no usable {split} records ({skipped.count} skipped)", where=str(path))
    return features, SplitRecords(split, str(path), sources, features, skipped)


# ---- the run --------------------------------------------------------------------------------------------


def term_beta(plan: LossPlan) -> tuple[float, bool]:
    """The monitor's reward scale (the first preference or kto term's beta, else 0.1) and whether
    that term is reference-free."""
    for term in plan.checked.terms:
        if term.name in ("preference", "kto"):
            loss_type = term.options.get("loss_type", "")
            return float(term.options.get("beta", 0.1)), loss_type in ("simpo", "cpo", "orpo")
    return 0.1, True


def build(config: TrainConfig, plan: LossPlan) -> TaskRun:
    from losslab.data.builtin import SPLITS
    from losslab.train.lora import prepare_policy
    from losslab.train.next_token import checked_head

    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    unpaired = plan.uses("kto")
    data_unpaired = unpaired_data(config)
    if data_unpaired and not unpaired:
        raise UserError(
            "unpaired records {prompt, completion, desirable} train with a kto term; "
            "paired losses need {prompt, chosen, rejected} records",
            where="loss.terms",
        )
    if unpaired and any(t.name != "kto" and t.name not in ("l2", "l2_sp") for t in plan.checked.terms):
        raise UserError("a kto loss trains on unpaired items: combine it with regularisers only", where="loss.terms")
    encoder = PreferenceEncoder(tokenizer, template=config.data.template, max_length=config.data.max_length)
    datasets: dict[str, list[dict]] = {}
    splits: dict[str, SplitRecords] = {}
    lines = []
    for split in SPLITS:
        read = read_preference_split(config, split, encoder, data_unpaired)
        if read is None:
            continue
        features, records = read
        if unpaired:
            features = add_mismatched(features if data_unpaired else unpair(features), config.data.max_length)
        datasets[split], splits[split] = features, records
        line = f"{split}: {len(features)} {'items' if unpaired else 'pairs'} from {records.path}"
        if records.skipped.count:
            line += f"; {records.skipped.count} records skipped (first: {records.skipped.examples[0]})"
        lines.append(line)
        print(line)
    if unpaired and not data_unpaired:
        print("kto: paired records unpaired (chosen -> desirable, rejected -> undesirable), as TRL does")
    mode = resolved_reference(config, plan)
    beta, reference_free = term_beta(plan)
    columns = reference_columns(unpaired) if mode == "cache" else ()
    collator = PreferenceCollator(
        tokenizer.pad_token_id, config.preference.layout, unpaired, columns, getattr(torch, config.dtype)
    )
    if mode == "cache":
        cache_reference(config, datasets, collator, unpaired)

    model = load_causal_lm(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    model = prepare_policy(model, config)  # LoRA adapters when config.lora is set
    if not checked_head(model):
        raise UserError(
            "the preference task scores completions through the fused head, and this model's logits are not "
            "its LM head applied to the last hidden state (logit soft-capping or scaling)",
            where="model",
        )
    head = output_embeddings(model)
    reference = load_reference(config, like=model) if mode == "model" else None
    forward = PreferenceForward(
        head=head,
        unpaired=unpaired,
        reference=reference,
        beta=beta,
        reference_free=reference_free or mode == "none",
        nll=not unpaired,
    )
    summary: dict[str, Any] = {
        "task": "preference",
        "data": lines,
        "skipped": skipped_records(splits),
        "truncated": encoder.truncations.log.to_dict(),
        "reference": mode + (f" ({reference_name(config)})" if mode != "none" else ""),
        "layout": config.preference.layout,
        "items": "unpaired (kto)"
        + ("; paired records unpaired: chosen -> desirable, rejected -> undesirable" if not data_unpaired else "")
        if unpaired
        else "pairs",
    }
    print(f"reference: {summary['reference']}; layout: {config.preference.layout}")
    evaluator = Evaluator(config, tokenizer, collator, forward, mode)
    return TaskRun(
        model=model,
        tokenizer=tokenizer,
        train=datasets["train"],
        validation=datasets.get("validation"),
        test=datasets.get("test"),
        collator=collator,
        forward=forward,
        evaluate=evaluator,
        summary=summary,
        shifts_labels=True,
    )
