"""``sequence_classification``: one label (``class``), a set of labels (``multi_label``) or a
number (``regression``) per text, on any backbone with a sequence-classification head.
docs/training.md#sequence_classification describes the label types, loss inputs and metrics."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from losslab.data.builtin import resolve_data_path
from losslab.data.records import iter_raw_records
from losslab.data.schemas import SCHEMAS, Text
from losslab.errors import UserError
from losslab.eval.classification import PerClassReport, classification_report, multilabel_report, regression_metrics
from losslab.eval.report import namespace
from losslab.losses.composite import LossInputs
from losslab.models import load_model, load_tokenizer
from losslab.train.adapter import TaskForward
from losslab.train.config import TrainConfig
from losslab.train.task import LossNeeds, LossPlan, TaskRun
from losslab.train.tasks.backbone import model_kwargs, set_pad_token
from losslab.train.tasks.batches import collate_texts, encode, eval_batch_size, eval_batches, model_inputs
from losslab.train.tasks.labels import label_id, label_vocabulary
from losslab.train.tasks.predictions import save_predictions
from losslab.train.tasks.records import encode_splits, per_record, read_splits, skipped_records


class MultiLabelRecord(BaseModel):
    """A text with any number of labels (an empty list is a valid "none of them")."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: Text
    label: list[Text]


SCHEMA: dict[str, type[BaseModel]] = {
    "class": SCHEMAS["classification"],
    "multi_label": MultiLabelRecord,
    "regression": SCHEMAS["regression"],
}
DEFAULT_TERMS = {
    "class": ({"name": "cross_entropy"},),
    "multi_label": ({"name": "binary_cross_entropy"},),
    "regression": ({"name": "mse"},),
}
PROVIDES = {
    "class": frozenset({"class_logits", "class_targets", "num_examples"}),
    "multi_label": frozenset({"class_logits", "class_targets", "num_examples"}),
    "regression": frozenset({"predictions", "targets", "num_examples"}),
}
PROBLEM_TYPE = {
    "class": "single_label_classification",
    "multi_label": "multi_label_classification",
    "regression": "regression",
}


def detect_label_type(config: TrainConfig) -> str:
    """``data.label_type``, or for ``auto`` the first training record's label: a list ->
    ``multi_label``, a float -> ``regression``, anything else -> ``class``."""
    if config.data.label_type != "auto":
        return config.data.label_type
    for _source, raw in iter_raw_records(resolve_data_path(config.data.train, "train")):
        if isinstance(raw, dict) and "label" in raw:
            label = raw["label"]
            return "multi_label" if isinstance(label, list) else "regression" if isinstance(label, float) else "class"
    return "class"


def class_names(config: TrainConfig, label_type: str, train_records: list[Any]) -> list[str]:
    """Class names in id order (none for regression)."""
    if label_type == "regression":
        return []
    if label_type == "multi_label":
        return label_vocabulary(config.data.label_names, [n for r in train_records for n in r.label])
    labels = [r.label for r in train_records]
    if all(isinstance(x, int) for x in labels):  # class ids
        return config.data.label_names or [str(i) for i in range(max(labels) + 1)]
    return label_vocabulary(config.data.label_names, [str(x) for x in labels])


def target(label_type: str, record: Any, label2id: dict[str, int], source: Any) -> int | float | list[float]:
    """The ``labels`` entry of one record: a class id, a 0/1 vector or a number."""
    if label_type == "regression":
        return float(record.label)
    if label_type == "multi_label":
        ids = {label_id(label2id, name, source) for name in record.label}
        return [1.0 if i in ids else 0.0 for i in range(len(label2id))]
    if isinstance(record.label, int):
        if not 0 <= record.label < len(label2id):
            raise UserError(
                f"field 'label': class id {record.label} is outside 0..{len(label2id) - 1}", where=str(source)
            )
        return record.label
    return label_id(label2id, record.label, source)


@dataclass
class TextCollator:
    """Padded texts and their ``labels``: (B,) class ids or (B, K) 0/1. Numbers (regression)
    go into ``targets`` (B,), and ``labels`` is (B,) zeros: the Trainer counts the entries of
    ``labels`` that are not -100 as trained items, and a target may well be -100.0."""

    pad_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_texts([f["encoding"] for f in features], self.pad_id)
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], float):
            batch["targets"] = torch.tensor(labels, dtype=torch.float32)
            batch["labels"] = torch.zeros(len(labels), dtype=torch.long)
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.long if isinstance(labels[0], int) else torch.float32)
        return batch


def gold(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The gold values of a batch: ``targets`` (B,) for regression, else ``labels``."""
    return batch["targets"] if "targets" in batch else batch["labels"]


def make_forward(label_type: str) -> TaskForward:
    def forward(model: torch.nn.Module, batch: dict[str, Any]) -> LossInputs:
        logits = model(**model_inputs(batch)).logits  # (B, C), (B, K) or (B, 1)
        labels = gold(batch)
        if label_type == "regression":
            return LossInputs(predictions=logits.squeeze(-1), targets=labels)
        return LossInputs(class_logits=logits, class_targets=labels)

    return forward


def scores(
    label_type: str, logits: torch.Tensor, labels: torch.Tensor, names: list[str]
) -> tuple[dict[str, float], PerClassReport | None]:
    """The metrics of a split from its logits (N, C) and ``labels`` (as in the batches),
    and the per-class report to print (None for regression)."""
    logits = logits.double()
    if label_type == "regression":
        return regression_metrics(labels.double(), logits[:, 0]), None
    if label_type == "multi_label":
        report = multilabel_report(labels.long(), logits, from_logits=True, labels=names)
        loss = F.binary_cross_entropy_with_logits(logits, labels.double())
    else:
        report = classification_report(labels, logits.argmax(-1), labels=names)
        loss = F.cross_entropy(logits, labels)
    return {**report.to_dict(), "loss": float(loss)}, report


def prediction_rows(
    label_type: str, logits: torch.Tensor, labels: torch.Tensor, names: list[str], texts: list[str | None]
) -> list[dict[str, Any]]:
    """One record per example from the split's logits (N, C) and ``labels`` (as in the batches):
    ``text``, ``gold``, ``predicted`` (and ``score`` for ``class``)."""
    if label_type == "regression":
        return [
            {"text": t, "gold": g, "predicted": p} for t, g, p in zip(texts, labels.tolist(), logits[:, 0].tolist())
        ]
    if label_type == "multi_label":  # threshold 0.5 on the sigmoid
        return [
            {
                "text": t,
                "gold": [n for n, y in zip(names, g) if y > 0.5],
                "predicted": [n for n, y in zip(names, p) if y],
            }
            for t, g, p in zip(texts, labels.tolist(), (logits > 0).tolist())
        ]
    score, pred = logits.double().softmax(-1).max(-1)
    return [
        {"text": t, "gold": names[g], "predicted": names[p], "score": round(s, 6)}
        for t, g, p, s in zip(texts, labels.tolist(), pred.tolist(), score.tolist())
    ]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: list[dict],
    split: str,
    *,
    collator: TextCollator,
    batch_size: int,
    label_type: str,
    names: list[str],
    output_dir: str | None = None,
) -> dict[str, float]:
    """The metrics of ``split`` (see the module docstring), named ``split/metric``; prints the
    report and writes the predictions into ``output_dir`` (when given)."""
    logits, labels = [], []
    for batch in eval_batches(model, dataset, collator, batch_size):
        logits.append(model(**model_inputs(batch)).logits.float().cpu())
        labels.append(gold(batch).cpu())
    logits_all, labels_all = torch.cat(logits), torch.cat(labels)
    save_predictions(
        output_dir, split, prediction_rows(label_type, logits_all, labels_all, names, [f.get("text") for f in dataset])
    )
    metrics, report = scores(label_type, logits_all, labels_all, names)
    if report is not None:
        print(f"{split}:\n{report}")
    return namespace(metrics, split)


def loss_needs(config: TrainConfig) -> LossNeeds:
    """The default term and the loss inputs of the config's label type (read from the first
    training record under ``label_type: auto``)."""
    label_type = detect_label_type(config)
    return LossNeeds(f"sequence_classification ({label_type})", DEFAULT_TERMS[label_type], PROVIDES[label_type])


def metric_names(config: TrainConfig) -> set[str]:
    """The names ``split/metric`` that :func:`evaluate` gives for each split of ``eval.splits``;
    a name ending in ``/*`` stands for one name per class, known from the data
    (checked against a real evaluation by tests/train/test_metric_names.py)."""
    label_type = detect_label_type(config)
    if label_type == "regression":
        names = ["mse", "rmse", "mae", "pearson", "spearman"]
    else:
        averages = ("micro", "macro", "weighted") if label_type == "multi_label" else ("macro", "weighted")
        extra = ["subset_accuracy", "hamming_loss"] if label_type == "multi_label" else ["accuracy"]
        names = [
            *extra,
            "loss",
            *(f"{score}_{avg}" for avg in averages for score in ("precision", "recall", "f1")),
            *(f"{score}/*" for score in ("precision", "recall", "f1", "support")),
        ]
    return {f"{split}/{name}" for split in config.eval.splits for name in names}


def build(config: TrainConfig, plan: LossPlan) -> TaskRun:
    from transformers import AutoModelForSequenceClassification

    label_type = detect_label_type(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    splits = read_splits(config, SCHEMA[label_type])
    names = class_names(config, label_type, splits["train"].records)
    label2id = {n: i for i, n in enumerate(names)}

    def encode_record(source: Any, record: Any) -> tuple[dict, bool]:
        encoding, cut = encode(tokenizer, record.text, max_length=config.data.max_length, drop=config.data.truncation)
        return {"encoding": encoding, "labels": target(label_type, record, label2id, source), "text": record.text}, cut

    datasets, lines = encode_splits(splits, per_record(config, encode_record))
    head = (
        {"num_labels": 1}
        if label_type == "regression"
        else {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": label2id}
    )
    model = load_model(
        AutoModelForSequenceClassification,
        config.model,
        problem_type=PROBLEM_TYPE[label_type],
        **head,
        **model_kwargs(config),
    )
    set_pad_token(model, tokenizer)
    collator = TextCollator(tokenizer.pad_token_id)
    return TaskRun(
        model=model,
        tokenizer=tokenizer,
        train=datasets["train"],
        validation=datasets.get("validation"),
        test=datasets.get("test"),
        collator=collator,
        forward=make_forward(label_type),
        evaluate=partial(
            evaluate,
            collator=collator,
            batch_size=eval_batch_size(config),
            label_type=label_type,
            names=names,
            output_dir=config.output_dir,
        ),
        summary={
            "task": "sequence_classification",
            "label_type": label_type,
            "labels": names,
            "data": lines,
            "skipped": skipped_records(splits),
        },
    )
