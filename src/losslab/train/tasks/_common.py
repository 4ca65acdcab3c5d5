"""What the encoder-style tasks share: reading split records, tokenising with a chosen
truncation side, padding, the task's loss plan, and one loss object for the Trainer.

``sequence_classification``, ``token_classification``, ``reward_model`` and ``embedding``
all run their own forward (:class:`TaskLossFunc`, used by
:class:`~losslab.train.trainer.LosslabTrainer` through ``compute_loss``) and normalise
item-level terms by the Trainer's ``num_items_in_batch``: the number of entries of the
batch's ``labels`` that are not ``-100`` over the whole accumulated batch (and every
process). Each collator therefore puts a ``labels`` tensor in the batch with one entry per
trained item (a text, a token, a pair).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from losslab.data.builtin import SPLITS, resolve_data_path
from losslab.data.records import SkipLog, Source, load_records
from losslab.errors import UserError
from losslab.losses.composite import CompositeLoss, LossInputs
from losslab.losses.registry import build_composite
from losslab.train.config import LossConfig, TrainConfig
from losslab.train.loss_func import TermAverager
from losslab.train.tasks import TaskRun

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")
REGULARISER_FIELDS = frozenset({"model", "reference_params"})

Forward = Callable[[torch.nn.Module, dict[str, Any]], tuple[LossInputs, dict[str, torch.Tensor]]]


# ---- records ---------------------------------------------------------------------------------


@dataclass
class SplitRecords:
    """The validated records of one split, with where each came from and what was skipped."""

    split: str
    path: str
    sources: list[Source]
    records: list[Any]
    skipped: SkipLog


def read_split(config: TrainConfig, split: str, schema: type[BaseModel]) -> SplitRecords | None:
    """The records of ``split`` (None when the config names no file for it), validated with
    ``schema``, bad ones raised or skipped per ``data.on_error``. The sample limit is applied
    by the task (a record may give several samples, or none)."""
    spec = getattr(config.data, split)
    if spec is None:
        return None
    path = resolve_data_path(spec, split)
    skipped = SkipLog()
    sources, records = [], []
    for source, record in load_records(path, schema, on_error=config.data.on_error, skipped=skipped):
        sources.append(source)
        records.append(record)
    if not records:
        raise UserError(f"no usable {split} records", where=str(path))
    return SplitRecords(split, str(path), sources, records, skipped)


def read_splits(config: TrainConfig, schema: type[BaseModel]) -> dict[str, SplitRecords]:
    """:func:`read_split` for every split the config names."""
    return {s: r for s in SPLITS if (r := read_split(config, s, schema)) is not None}


def skipped_records(splits: dict[str, SplitRecords]) -> dict[str, dict[str, Any]]:
    """Per split: how many bad records ``on_error: skip`` skipped and which (``file:line: reason``)."""
    return {split: records.skipped.to_dict() for split, records in splits.items()}


def sample_limit(config: TrainConfig, split: str) -> int | None:
    return config.data.max_train_samples if split == "train" else config.data.max_eval_samples


SplitEncoder = Callable[[str, SplitRecords], tuple[list[dict], int]]


def per_record(config: TrainConfig, encode_record: Callable[[Source, Any], tuple[dict, bool]]) -> SplitEncoder:
    """A split encoder for tasks with one sample per record: ``encode_record(source, record)
    -> (feature, truncated)`` on the first ``max_*_samples`` records."""

    def encode_split(split: str, records: SplitRecords) -> tuple[list[dict], int]:
        features, truncated = [], 0
        for source, record in list(zip(records.sources, records.records))[: sample_limit(config, split)]:
            feature, cut = encode_record(source, record)
            features.append(feature)
            truncated += cut
        return features, truncated

    return encode_split


def encode_splits(splits: dict[str, SplitRecords], encode_split: SplitEncoder) -> tuple[dict[str, list[dict]], list[str]]:
    """The samples of every split (``encode_split(split, records) -> (features, truncated)``)
    and one printed log line per split."""
    datasets, lines = {}, []
    for split, records in splits.items():
        features, truncated = encode_split(split, records)
        datasets[split] = features
        lines.append(describe_split(split, len(features), records, truncated))
        print(lines[-1])
    return datasets, lines


def describe_split(split: str, n_samples: int, records: SplitRecords, truncated: int) -> str:
    """One line for the log and the summary: samples, skipped records, truncated samples."""
    text = f"{split}: {n_samples} samples from {records.path}"
    if records.skipped.count:
        text += f"; {records.skipped.count} bad records skipped (first: {records.skipped.examples[0]})"
    if truncated:
        text += f"; {truncated} truncated to max_length"
    return text


# ---- tokenising and padding ------------------------------------------------------------------


def encode(tokenizer: Any, text: Any, pair: Any = None, *, max_length: int, drop: str = "end", **kwargs: Any) -> tuple[dict[str, list[int]], bool]:
    """Tokenise ``text`` (and ``pair``) to at most ``max_length`` tokens, special tokens included.

    ``drop``: which end of a too-long text is cut (``"end"`` keeps the start, ``"start"``
    keeps the end); a pair loses tokens from its longer member. Returns the encoding
    (``input_ids``, ``token_type_ids`` when the tokenizer makes them, and ``word_ids`` with
    ``is_split_into_words=True``) and whether anything was cut.
    """
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "right" if drop == "end" else "left"
    try:
        enc = tokenizer(text, pair, truncation=True, max_length=max_length, **kwargs)
        truncated = len(enc["input_ids"]) >= max_length and len(tokenizer(text, pair, **kwargs)["input_ids"]) > max_length
    finally:
        tokenizer.truncation_side = side
    out = {"input_ids": list(enc["input_ids"])}
    if "token_type_ids" in enc:
        out["token_type_ids"] = list(enc["token_type_ids"])
    if kwargs.get("is_split_into_words"):
        out["word_ids"] = enc.word_ids()
    return out, truncated


def pad(rows: Sequence[Sequence[int | float]], value: int | float, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) right-padded to the longest row with ``value``."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype)


def collate_texts(encodings: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (and ``token_type_ids``) of encoded texts, right-padded."""
    ids = [e["input_ids"] for e in encodings]
    batch = {
        "input_ids": pad(ids, pad_id, torch.long),
        "attention_mask": pad([[1] * len(r) for r in ids], 0, torch.long),
    }
    if all("token_type_ids" in e for e in encodings):
        batch["token_type_ids"] = pad([e["token_type_ids"] for e in encodings], 0, torch.long)
    return batch


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The forward arguments of an encoder or decoder (ids, mask, token types) from a batch."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def eval_batches(model: torch.nn.Module, dataset: Sequence[dict], collator: Callable[[list[dict]], dict[str, Any]],
                 batch_size: int) -> Iterator[dict[str, Any]]:
    """Collated batches of ``dataset`` on the model's device, with the model in eval mode
    (restored afterwards). Call it under ``torch.no_grad()`` and exhaust it."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collator(list(dataset[start : start + batch_size]))
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    finally:
        model.train(was_training)


def eval_batch_size(config: TrainConfig) -> int:
    return config.training.eval_batch_size or config.training.batch_size


# ---- the loss ---------------------------------------------------------------------------------


def uses_default_loss(config: TrainConfig) -> bool:
    """True when ``loss.terms`` is the generic default (``token_cross_entropy``, made for causal LMs)."""
    return config.loss.terms == LossConfig().terms


@dataclass
class LossPlan:
    """The terms a task trains with: the config's, or the task's default when the config keeps
    the generic one; ``note`` says which, for the summary."""

    terms: list[dict[str, Any]]
    is_default: bool
    note: str
    provides: set[str]

    def composite(self, configured: CompositeLoss) -> CompositeLoss:
        """The runner's composite (built from the config), or the task default's."""
        return build_composite(self.terms) if self.is_default else configured

    def requires(self, field: str) -> bool:
        """True when some term cannot be computed without the optional batch field ``field``."""
        without = (self.provides - {field}) | REGULARISER_FIELDS
        return bool(build_composite(self.terms, total_steps=1).missing_inputs(without))


def plan_loss(config: TrainConfig, task: str, default_terms: list[dict[str, Any]], provides: set[str]) -> LossPlan:
    """Choose the terms and check, before any model is loaded, that the task's batches give
    every input they read (``provides``: the :class:`LossInputs` fields the task fills)."""
    is_default = uses_default_loss(config)
    terms = [dict(t) for t in default_terms] if is_default else config.loss.terms
    names = ", ".join(str(t.get("name")) for t in terms)
    note = f"{names} (the {task} default; set loss.terms to change it)" if is_default else names
    problems = build_composite(terms, total_steps=1, where="loss.terms").missing_inputs(provides | REGULARISER_FIELDS)
    if problems:
        raise UserError(f"{'; '.join(problems)}; a {task} batch provides {', '.join(sorted(provides))}", where="loss.terms")
    return LossPlan(terms, is_default, note, provides)


def reference_params(model: torch.nn.Module, composite: CompositeLoss) -> dict[str, torch.Tensor] | None:
    """Detached copies of every parameter before training: the anchor of ``l2_sp`` terms."""
    if not any(t.name == "l2_sp" for t in composite.terms):
        return None
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class TaskLossFunc:
    """A task's composite loss for :class:`~losslab.train.trainer.LosslabTrainer`.

    ``forward(model, batch) -> (LossInputs, outputs)`` runs the task's forward on the model
    the Trainer passes (the DDP-wrapped one) and fills the batch fields of
    :class:`LossInputs`; this adds ``num_examples`` (the Trainer's ``num_items_in_batch``), the
    model and the ``l2_sp`` reference, evaluates the composite at :attr:`step` (set by
    :class:`~losslab.train.trainer.LossTermsCallback`) and records every term for the log.

    With ``num_items_in_batch`` (training), item-level terms are ``sum / global count``, so
    micro-batches and processes add up exactly; the loss is multiplied by the number of
    processes because DDP averages gradients (as ``Trainer.compute_loss`` does for a
    ``compute_loss_func``).
    """

    def __init__(self, composite: CompositeLoss, forward: Forward, *, model: torch.nn.Module,
                 reference_params: dict[str, torch.Tensor] | None = None) -> None:
        self.composite = composite
        self.forward = forward
        self.model = model
        self.reference_params = reference_params
        self.step = 0
        self.per_batch_scale = 1.0  # 1 / (accumulation steps x processes), set by LossTermsCallback
        self.num_sequences: Any = None  # rows with a trained token in the optimizer step, set by LosslabTrainer
        self.train_terms = TermAverager()
        self.eval_terms = TermAverager()

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        loss_inputs, outputs = self.forward(model, inputs)
        loss_inputs.num_examples = num_items_in_batch  # the global count of trained items
        loss_inputs.num_items = num_items_in_batch  # the same for token-level terms (token_classification)
        if model.training and num_items_in_batch is not None:
            loss_inputs.num_sequences = self.num_sequences  # token terms with the `sequence` reduction
        loss_inputs.model = self.model
        loss_inputs.reference_params = self.reference_params
        scale = self.per_batch_scale if model.training and num_items_in_batch is not None else 1.0
        out = self.composite(loss_inputs, self.step, scale)
        if model.training:
            self.train_terms.add(out, group=self.step)
        else:
            self.eval_terms.add(out)
        loss = out.total
        if num_items_in_batch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            loss = loss * torch.distributed.get_world_size()
        return (loss, outputs) if return_outputs else loss


def task_run(*, model: torch.nn.Module, tokenizer: Any, datasets: dict[str, list[dict]], collator: Callable,
             plan: LossPlan, forward: Forward, evaluate: Callable, summary: dict[str, Any]) -> TaskRun:
    """The :class:`TaskRun` of an encoder-style task; its loss is a :class:`TaskLossFunc`
    over ``forward`` with the composite ``plan`` chooses."""

    def make_loss_func(configured: CompositeLoss) -> TaskLossFunc:
        composite = plan.composite(configured)
        return TaskLossFunc(composite, forward, model=model, reference_params=reference_params(model, composite))

    print(f"loss: {plan.note}")
    return TaskRun(model=model, tokenizer=tokenizer, train=datasets["train"], validation=datasets.get("validation"),
                   test=datasets.get("test"), collator=collator, make_loss_func=make_loss_func, evaluate=evaluate,
                   summary={**summary, "loss": plan.note})


def label_vocabulary(config_names: list[str] | None, found: Sequence[str], *, first: str | None = None) -> list[str]:
    """Class names in id order: ``data.label_names`` if set, else the sorted names found (with
    ``first``, e.g. ``O``, moved to the front when present)."""
    if config_names:
        if len(set(config_names)) != len(config_names):
            raise UserError("data.label_names has repeated names", where="data.label_names")
        return list(config_names)
    names = sorted(set(found))
    if first is not None and first in names:
        names.remove(first)
        names.insert(0, first)
    return names


def label_id(label2id: dict[str, int], name: str, source: Source, field: str = "label") -> int:
    """The id of a class name, or a :class:`UserError` naming the record and the known names."""
    if name not in label2id:
        known = ", ".join(label2id) if len(label2id) <= 30 else f"{len(label2id)} names"
        raise UserError(f"field {field!r}: unknown label {name!r} (known: {known}; set data.label_names to fix the set)",
                        where=str(source))
    return label2id[name]


def model_kwargs(config: TrainConfig) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments shared by every task model."""
    return {"dtype": getattr(torch, config.dtype), "trust_remote_code": config.trust_remote_code}


def set_pad_token(model: torch.nn.Module, tokenizer: Any) -> None:
    """Decoder backbones read the score at the last non-padding token: they need the pad id."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
