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
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from pydantic import field_validator

from losslab.data.builtin import resolve_data_path
from losslab.data.records import Source, iter_raw_records, load_records
from losslab.data.schemas import PreferenceRecord, UnpairedPreferenceRecord
from losslab.errors import UserError
from losslab.eval.report import namespace
from losslab.eval.sentiment import vader_compound
from losslab.files import write_atomic
from losslab.losses.composite import LossInputs
from losslab.losses.logprobs import fused_sequence_logps
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
from losslab.train.tasks.records import SplitRecords, sample_limit, skipped_records

PAIRED = frozenset({"chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths", "num_sequences"})
PAIRED_REFERENCE = frozenset({"ref_chosen_logps", "ref_rejected_logps"})
UNPAIRED = frozenset({"policy_logps", "desirable", "num_sequences"})
UNPAIRED_REFERENCE = frozenset({"ref_logps", "kl_baseline"})
CROSS_ENTROPY = frozenset({"labels", "hidden_states", "lm_head_weight", "num_items"})
"""The chosen replies' next-token inputs (paired batches only): a token_cross_entropy term's."""

DEFAULT_TERMS = ({"name": "preference", "loss_type": "sigmoid", "beta": 0.1},)
DEFAULT_UNPAIRED_TERMS = ({"name": "kto", "beta": 0.1},)
MONITOR = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected")
"""What every step logs besides the loss terms (``eval_`` prefixed in evaluation)."""
METRICS = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected")
GENERATION_METRICS = ("reward", "kl")
GENERATION_SEED = 1234


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


# ---- batches ----------------------------------------------------------------------------------------


def row_items(features: list[dict[str, Any]], unpaired: bool) -> list[dict[str, list[int]]]:
    """The pair layout's items: a paired feature's prompt, chosen and rejected ids; an unpaired
    one's prompt, completion (as ``chosen``) and the KL estimate's mismatched reply (``rejected``)."""
    if unpaired:
        return [{"prompt": f["prompt"], "chosen": f["completion"], "rejected": f["kl_completion"]} for f in features]
    return [{"prompt": f["prompt"], "chosen": f["chosen"], "rejected": f["rejected"]} for f in features]


@dataclass
class PreferenceCollator:
    """A batch of features: the pair layout's rows (model inputs, ``score_positions``,
    ``targets``, ``segments``, ``labels``), plus ``margins``, ``desirable`` and the cached
    reference columns when the features carry them."""

    pad_id: int
    layout: str
    unpaired: bool
    reference_columns: tuple[str, ...] = ()
    mask_dtype: torch.dtype = torch.float32

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        from losslab.train.tasks.pair_rows import pair_batch

        items = row_items(features, self.unpaired)
        batch = pair_batch(items, layout=self.layout, pad_id=self.pad_id, mask_dtype=self.mask_dtype)
        if self.unpaired:
            batch["desirable"] = torch.tensor([bool(f["desirable"]) for f in features])
        elif any("margin" in f for f in features):
            batch["margins"] = torch.tensor([float(f.get("margin", 0.0)) for f in features])
        for column in self.reference_columns:
            if all(column in f for f in features):
                batch[column] = torch.tensor([float(f[column]) for f in features], dtype=torch.float32)
        return batch


def sequence_sums(
    model: torch.nn.Module, head: torch.nn.Module, batch: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward on the batch's rows (a :mod:`~losslab.train.tasks.pair_rows` batch):
    ``(sums, counts)`` (S,) of the completions' log-probs through the fused head (pairs: first
    B chosen / completion, last B rejected / mismatched reply), and the last hidden states (R, T, D)."""
    ids = batch["input_ids"]
    from losslab.train.tasks.pair_rows import model_inputs

    # the 4D mask in the form the model's attention takes (read off the model a wrapper holds)
    inputs = model_inputs(batch, cast(torch.nn.Module, getattr(model, "module", model)))
    out = model(**inputs, output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long, device=ids.device))
    hidden = out.hidden_states[-1]  # (R, T, D)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (R * T, D)
    scored = flat.index_select(0, batch["score_positions"])  # (M, D)
    sums, counts = fused_sequence_logps(
        scored,
        cast(torch.Tensor, head.weight),
        batch["targets"],
        batch["segments"],
        int(batch["num_segments"]),
        bias=getattr(head, "bias", None),
    )
    return sums, counts, hidden


def batch_pairs(batch: dict[str, Any]) -> int:
    """B: the pairs (or unpaired items) of a collated batch."""
    return int(batch["num_segments"]) // 2


def distributed_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over processes (itself in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return value


@dataclass
class PreferenceForward:
    """The task's forward: ``(model, batch) -> LossInputs`` (see the module docstring).

    ``reference``: the frozen reference model run on the same rows each step (``model`` mode),
    or None (cached columns in the batch, or no reference). ``beta``: the monitor's reward scale.
    """

    head: torch.nn.Module
    unpaired: bool
    reference: torch.nn.Module | None = None
    beta: float = 0.1
    reference_free: bool = False
    nll: bool = True

    def reference_sums(self, batch: dict[str, Any]) -> torch.Tensor:
        """The reference's (2B,) log-prob sums on the batch's rows (no gradient)."""
        assert self.reference is not None
        device = batch["input_ids"].device
        if next(self.reference.parameters()).device != device:
            self.reference.to(device)
        with torch.no_grad():
            head = output_embeddings(self.reference)
            return sequence_sums(self.reference, head, batch)[0]

    def reference_columns(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The reference's per-item values of a batch (what the cache stores)."""
        b = batch_pairs(batch)
        sums = self.reference_sums(batch)
        if self.unpaired:
            return {"ref_logps": sums[:b], "ref_kl_logps": sums[b:]}
        return {"ref_chosen_logps": sums[:b], "ref_rejected_logps": sums[b:]}

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossInputs:
        b = batch_pairs(batch)
        sums, counts, hidden = sequence_sums(model, self.head, batch)
        refs = self.reference_columns(batch) if self.reference is not None else {}
        refs.update(
            {k: batch[k] for k in ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps") if k in batch}
        )
        refs = {k: v.to(sums.dtype) for k, v in refs.items()}
        if self.unpaired:
            return self.unpaired_inputs(batch, sums, counts, refs, b)
        chosen, rejected = sums[:b], sums[b:]
        inputs = LossInputs(
            chosen_logps=chosen,
            rejected_logps=rejected,
            chosen_lengths=counts[:b],
            rejected_lengths=counts[b:],
            ref_chosen_logps=refs.get("ref_chosen_logps"),
            ref_rejected_logps=refs.get("ref_rejected_logps"),
            margins=batch.get("margins"),
        )
        if self.nll:
            weight = cast(torch.Tensor, self.head.weight)
            inputs.labels = batch["labels"][:, 1:]
            inputs.hidden_states = hidden[:, :-1]
            inputs.lm_head_weight = weight
            inputs.lm_head_bias = getattr(self.head, "bias", None)
        inputs.monitor = self.monitor(
            chosen, rejected, counts[:b], counts[b:], refs.get("ref_chosen_logps"), refs.get("ref_rejected_logps")
        )
        return inputs

    def rewards(self, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        """beta x (policy - reference) log-probs; without a reference, the length-normalised log-probs."""
        logps = logps.detach()
        if ref is None or self.reference_free:
            return logps / lengths.clamp(min=1)
        return self.beta * (logps - ref)

    def monitor(
        self,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
        ref_chosen: torch.Tensor | None,
        ref_rejected: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        rc = self.rewards(chosen, chosen_lengths, ref_chosen)
        rr = self.rewards(rejected, rejected_lengths, ref_rejected)
        return {
            "rewards/chosen": rc.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracy": (rc > rr).float().mean(),
            "rewards/margin": (rc - rr).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }

    def unpaired_inputs(
        self,
        batch: dict[str, Any],
        sums: torch.Tensor,
        counts: torch.Tensor,
        refs: dict[str, torch.Tensor],
        b: int,
    ) -> LossInputs:
        policy, policy_kl = sums[:b], sums[b:].detach()
        desirable = batch["desirable"].to(torch.bool)
        ref, ref_kl = refs.get("ref_logps"), refs.get("ref_kl_logps")
        kl = None
        if ref_kl is not None:
            # KTO's baseline: KL(policy || reference) estimated on mismatched (prompt, reply) pairs,
            # the mean over the batch (and processes during training), clamped at 0, as TRL does
            kl = (policy_kl - ref_kl).mean()
            if torch.is_grad_enabled():
                kl = distributed_mean(kl)
            kl = kl.clamp(min=0).detach()
        inputs = LossInputs(policy_logps=policy, ref_logps=ref, desirable=desirable, kl_baseline=kl)
        rewards = self.rewards(policy, counts[:b], ref)
        nan = torch.tensor(float("nan"), device=policy.device)
        rc = rewards[desirable].mean() if desirable.any() else nan
        rr = rewards[~desirable].mean() if (~desirable).any() else nan
        lc = policy.detach()[desirable].mean() if desirable.any() else nan
        lr = policy.detach()[~desirable].mean() if (~desirable).any() else nan
        correct = torch.where(desirable, rewards > 0, rewards < 0).float().mean()
        inputs.monitor = {
            "rewards/chosen": rc,
            "rewards/rejected": rr,
            "rewards/accuracy": correct,
            "rewards/margin": rc - rr,
            "logps/chosen": lc,
            "logps/rejected": lr,
        }
        if kl is not None:
            inputs.monitor["kl"] = kl
        return inputs


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
            if config.data.on_error == "raise":
                raise
            skipped.add(f"{source}: {exc.message}")
            continue
        sources.append(source)
        features.append(feature)
    if not features:
        raise UserError(f"no usable {split} records ({skipped.count} skipped)", where=str(path))
    return features, SplitRecords(split, str(path), sources, features, skipped)


# ---- the run --------------------------------------------------------------------------------------------

REFERENCE_FIELDS = PAIRED_REFERENCE | UNPAIRED_REFERENCE


def resolved_reference(config: TrainConfig, plan: LossPlan) -> str:
    """model | cache | none: ``preference.reference``, with ``auto`` read off the plan."""
    if config.preference.reference != "auto":
        return config.preference.reference
    return "cache" if plan.needs.provides & REFERENCE_FIELDS else "none"


def term_beta(plan: LossPlan) -> tuple[float, bool]:
    """The monitor's reward scale (the first preference or kto term's beta, else 0.1) and whether
    that term is reference-free."""
    for term in plan.checked.terms:
        if term.name in ("preference", "kto"):
            loss_type = term.options.get("loss_type", "")
            return float(term.options.get("beta", 0.1)), loss_type in ("simpo", "cpo", "orpo")
    return 0.1, True


def reference_columns(unpaired: bool) -> tuple[str, str]:
    return ("ref_logps", "ref_kl_logps") if unpaired else ("ref_chosen_logps", "ref_rejected_logps")


def reference_name(config: TrainConfig) -> str:
    return config.preference.reference_model or config.model


def load_reference(config: TrainConfig, *, like: torch.nn.Module | None = None) -> torch.nn.Module:
    """The frozen reference: ``preference.reference_model`` loaded, else a copy of ``like`` (the
    policy before training) or ``config.model`` loaded afresh."""
    from losslab.train.reference import frozen_reference

    if config.preference.reference_model is None and like is not None:
        return frozen_reference(like=like)
    return frozen_reference(reference_name(config), dtype=config.dtype, trust_remote_code=config.trust_remote_code)


def output_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """A causal LM's LM head (``get_output_embeddings()``)."""
    head = cast(Any, model).get_output_embeddings()
    if head is None:
        raise UserError("the preference task needs a causal LM with an output embedding (LM head)", where="model")
    return cast(torch.nn.Module, head)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def collated_on(collator: Callable[[list[dict]], dict[str, Any]], features: list[dict], device: torch.device) -> dict:
    batch = collator(features)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def cache_reference(
    config: TrainConfig, datasets: dict[str, list[dict]], collator: PreferenceCollator, unpaired: bool
) -> None:
    """Adds the reference's columns to every feature, from the cache or computed once (the
    reference model loaded only when something is missing)."""
    from losslab.train.reference import cached_logps, reference_fingerprint

    columns = reference_columns(unpaired)
    fields = ("prompt", "completion", "kl_completion") if unpaired else ("prompt", "chosen", "rejected")
    loaded: dict[str, PreferenceForward] = {}

    def compute(items: list[Any]) -> torch.Tensor:
        if "forward" not in loaded:
            reference = load_reference(config)
            if torch.cuda.is_available():
                reference.to("cuda")
            head = output_embeddings(reference)
            loaded["forward"] = PreferenceForward(head=head, unpaired=unpaired, reference=reference)
        forward = loaded["forward"]
        assert forward.reference is not None
        batch = collated_on(collator, list(items), device_of(forward.reference))
        values = forward.reference_columns(batch)
        return torch.stack([values[c] for c in columns], dim=1)

    batch_size = config.training.eval_batch_size or config.training.batch_size
    for split, features in datasets.items():
        fingerprint = reference_fingerprint(
            reference_name(config),
            features,
            fields=fields,
            extra={"dtype": config.dtype, "layout": config.preference.layout, "columns": list(columns)},
            code=["losslab.train.tasks.preference", "losslab.train.tasks.pair_rows", "losslab.losses.logprobs"],
        )
        values = cached_logps(features, compute, fingerprint=fingerprint, batch_size=batch_size, columns=columns)
        for feature, row in zip(features, values.tolist()):
            feature.update(zip(columns, row))
        print(f"reference log-probs ({split}): {len(features)} items, cache entry {fingerprint}")


def build(config: TrainConfig, plan: LossPlan) -> TaskRun:
    from losslab.data.builtin import SPLITS
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


# ---- evaluation -----------------------------------------------------------------------------------------


@dataclass
class Evaluator:
    """``evaluate(model, dataset, split)``: reward accuracy, margin, rewards and log-probs on the
    held-out pairs (unpaired items: desirable vs undesirable ones), and with ``eval.generate``
    the VADER reward of sampled replies and their sequence KL to the reference."""

    config: TrainConfig
    tokenizer: Any
    collator: PreferenceCollator
    forward: PreferenceForward
    mode: str
    reference: torch.nn.Module | None = field(default=None, repr=False)

    def __call__(self, model: torch.nn.Module, dataset: list[dict], split: str) -> dict[str, float]:
        metrics = self.reward_metrics(model, dataset, split)
        if self.config.eval.generate:
            metrics.update(self.generation_metrics(model, dataset, split))
        return namespace(metrics, split)

    @torch.no_grad()
    def scores(self, model: torch.nn.Module, dataset: list[dict]) -> list[dict[str, float]]:
        """Per feature: the policy's and reference's log-probs of both completions and the rewards."""
        was_training = model.training
        model.eval()
        rows: list[dict[str, float]] = []
        batch_size = self.config.training.eval_batch_size or self.config.training.batch_size
        try:
            for start in range(0, len(dataset), batch_size):
                features = dataset[start : start + batch_size]
                batch = collated_on(self.collator, features, device_of(model))
                b = batch_pairs(batch)
                sums, counts, _ = sequence_sums(model, self.forward.head, batch)
                refs = self.forward.reference_columns(batch) if self.forward.reference is not None else {}
                refs.update({k: batch[k] for k in reference_columns(self.forward.unpaired) if k in batch})
                first, second = reference_columns(self.forward.unpaired)
                r1 = self.forward.rewards(sums[:b], counts[:b], refs.get(first))
                r2 = self.forward.rewards(sums[b:], counts[b:], refs.get(second))
                for i in range(b):
                    rows.append(
                        {
                            "logps": float(sums[i]),
                            "other_logps": float(sums[b + i]),
                            "reward": float(r1[i]),
                            "other_reward": float(r2[i]),
                        }
                    )
        finally:
            model.train(was_training)
        return rows

    def reward_metrics(self, model: torch.nn.Module, dataset: list[dict], split: str) -> dict[str, float]:
        rows = self.scores(model, dataset)
        if self.forward.unpaired:
            return self.unpaired_metrics(dataset, rows, split)
        chosen = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
        rejected = torch.tensor([r["other_reward"] for r in rows], dtype=torch.float64)
        save_rows = [
            {
                "prompt": f["prompt_text"],
                "chosen": f["chosen_text"],
                "rejected": f["rejected_text"],
                "reward_chosen": r["reward"],
                "reward_rejected": r["other_reward"],
                "logps_chosen": r["logps"],
                "logps_rejected": r["other_logps"],
            }
            for f, r in zip(dataset, rows)
        ]
        self.save(f"predictions_{split}.jsonl", save_rows)
        return pair_metrics(chosen, rejected, [r["logps"] for r in rows], [r["other_logps"] for r in rows])

    def unpaired_metrics(self, dataset: list[dict], rows: list[dict[str, float]], split: str) -> dict[str, float]:
        """Items unpaired from pairs are paired again (``pair``); truly unpaired items give the
        desirable vs undesirable means, accuracy = the share of rewards on the right side of 0."""
        self.save(
            f"predictions_{split}.jsonl",
            [
                {
                    "prompt": f["prompt_text"],
                    "completion": f["completion_text"],
                    "desirable": bool(f["desirable"]),
                    "reward": r["reward"],
                    "logps": r["logps"],
                }
                for f, r in zip(dataset, rows)
            ],
        )
        if all("pair" in f for f in dataset):
            by_pair: dict[int, dict[bool, dict[str, float]]] = {}
            for f, r in zip(dataset, rows):
                by_pair.setdefault(int(f["pair"]), {})[bool(f["desirable"])] = r
            whole = [p for p in by_pair.values() if len(p) == 2]
            if whole:
                return pair_metrics(
                    torch.tensor([p[True]["reward"] for p in whole], dtype=torch.float64),
                    torch.tensor([p[False]["reward"] for p in whole], dtype=torch.float64),
                    [p[True]["logps"] for p in whole],
                    [p[False]["logps"] for p in whole],
                )
        desirable = torch.tensor([bool(f["desirable"]) for f in dataset])
        rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
        logps = torch.tensor([r["logps"] for r in rows], dtype=torch.float64)

        def mean(values: torch.Tensor) -> float:
            return float(values.mean()) if values.numel() else float("nan")

        return {
            "reward_accuracy": float(torch.where(desirable, rewards > 0, rewards < 0).double().mean()),
            "reward_margin": mean(rewards[desirable]) - mean(rewards[~desirable]),
            "reward_chosen": mean(rewards[desirable]),
            "reward_rejected": mean(rewards[~desirable]),
            "logps_chosen": mean(logps[desirable]),
            "logps_rejected": mean(logps[~desirable]),
        }

    def save(self, name: str, rows: list[dict[str, Any]]) -> None:
        if not is_main_process():
            return
        write_atomic(
            Path(self.config.output_dir) / name,
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
        )

    # -- generations ----------------------------------------------------------------------------------

    def reference_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The reference for the KL: the on-the-fly one, else loaded for the occasion (and kept)."""
        if self.forward.reference is not None:
            return self.forward.reference
        if self.reference is None:
            self.reference = load_reference(self.config)
        self.reference.to(device_of(model))
        return self.reference

    def generation_metrics(self, model: torch.nn.Module, dataset: list[dict], split: str) -> dict[str, float]:
        """Sampled replies (a fixed seed per split, temperature 1, no top-k/top-p: draws from the
        policy) to ``eval.generation_samples`` prompts spread evenly over the split; ``reward``: their mean VADER compound
        score; ``kl``: the mean over replies of log pi(y|x) - log pi_ref(y|x), summed over the
        reply's tokens (its end-of-turn token included)."""
        picked = spread(len(dataset), self.config.eval.generation_samples)
        prompts = [dataset[i]["prompt"] for i in picked]
        # the held-out answer a human preferred (chosen, or a desirable completion): shown beside the replies
        references = [dataset[i].get("chosen_text", dataset[i].get("completion_text", "")) for i in picked]
        seed = GENERATION_SEED + zlib.crc32(split.encode())  # the same draws for every variant of a study
        replies = sample_replies(model, self.tokenizer, prompts, self.config.eval.max_new_tokens, seed=seed)
        texts = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]
        rewards = vader_compound(texts)
        items = [{"prompt": p, "completion": r} for p, r in zip(prompts, replies)]
        policy = completion_logps(model, self.forward.head, items, self.collator.pad_id)
        reference = self.reference_model(model)
        ref_head = output_embeddings(reference)
        ref = completion_logps(reference, ref_head, items, self.collator.pad_id)
        ratios = [p - r for p, r in zip(policy, ref)]
        self.save(
            f"generations_{split}.jsonl",
            [
                {"prompt": self.tokenizer.decode(p), "reference": ref_text, "hypothesis": t, "reward": w, "kl": q}
                for p, ref_text, t, w, q in zip(prompts, references, texts, rewards, ratios)
            ],
        )
        n = max(1, len(rewards))
        return {"reward": sum(rewards) / n, "kl": sum(ratios) / n}


def spread(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices spread evenly over ``range(n)`` (the first one is 0): held-out files
    are often grouped by source, and the first k records would all be from one."""
    k = min(n, k)
    return [i * n // k for i in range(k)]


def pair_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, logps_chosen: list[float], logps_rejected: list[float]
) -> dict[str, float]:
    """Reward accuracy (ties half), mean margin and rewards, mean log-probs of N pairs."""
    return {
        "reward_accuracy": float(((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean()),
        "reward_margin": float((chosen - rejected).mean()),
        "reward_chosen": float(chosen.mean()),
        "reward_rejected": float(rejected.mean()),
        "logps_chosen": sum(logps_chosen) / max(1, len(logps_chosen)),
        "logps_rejected": sum(logps_rejected) / max(1, len(logps_rejected)),
    }


def is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


@torch.no_grad()
def sample_replies(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    seed: int,
    batch_size: int = 16,
) -> list[list[int]]:
    """Sampled replies (token ids, up to and including the end-of-turn token) to token-id
    prompts, left-padded in batches; reproducible: the random state is forked and seeded."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
    stops = set(eos) if isinstance(eos, list) else {eos}
    replies: list[list[int]] = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                group = prompts[start : start + batch_size]
                width = max(len(p) for p in group)
                ids = torch.full((len(group), width), pad, dtype=torch.long)
                attention = torch.zeros_like(ids)
                for row, p in enumerate(group):
                    ids[row, width - len(p) :] = torch.tensor(p)
                    attention[row, width - len(p) :] = 1
                out = model.generate(  # type: ignore[operator]
                    input_ids=ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=pad,
                )
                for row in range(len(group)):
                    reply = out[row, width:].tolist()
                    end = next((i for i, t in enumerate(reply) if t in stops), None)
                    replies.append(reply[: end + 1] if end is not None else reply)
    finally:
        model.train(was_training)
    return replies


@torch.no_grad()
def completion_logps(
    model: torch.nn.Module, head: torch.nn.Module, items: list[dict[str, list[int]]], pad_id: int, batch_size: int = 16
) -> list[float]:
    """log pi(completion | prompt) summed over the completion's tokens, per item (one row each)."""
    from losslab.train.tasks.pair_rows import item_batch

    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for start in range(0, len(items), batch_size):
            group = items[start : start + batch_size]
            batch = item_batch(group, layout="padded", pad_id=pad_id)
            batch = {k: v.to(device_of(model)) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out.extend(sequence_sums(model, head, batch)[0].tolist())
    finally:
        model.train(was_training)
    return out
