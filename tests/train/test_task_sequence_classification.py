"""sequence_classification: evaluation against hand-computed numbers, label types, default loss."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from losslab.data.records import Source
from losslab.errors import UserError
from losslab.train.config import TrainConfig
from losslab.train.task import plan_loss
from losslab.train.tasks.sequence_classification import TextCollator, detect_label_type, evaluate, target


class FirstTokenHead(torch.nn.Module):
    """A stand-in classifier: the logits of a text are ``table[first token id]``."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float64), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def dataset(first_ids: list[int], labels: list) -> list[dict]:
    # uneven lengths, 2 batches of at most 3: padding and batching must not change anything
    return [
        {"encoding": {"input_ids": [i] + [7] * (k % 3)}, "labels": y} for k, (i, y) in enumerate(zip(first_ids, labels))
    ]


def run_evaluate(
    table: list[list[float]], first_ids: list[int], labels: list, label_type: str, names: list[str]
) -> dict:
    return evaluate(
        FirstTokenHead(table),
        dataset(first_ids, labels),
        "test",
        collator=TextCollator(pad_id=0),
        batch_size=3,
        label_type=label_type,
        names=names,
    )


def log_softmax(row: list[float], i: int) -> float:
    return row[i] - math.log(sum(math.exp(x) for x in row))


def test_class_report_by_hand() -> None:
    table = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]]
    labels = [0, 1, 1, 2]  # predictions 0, 1, 2, 0: rows 0 and 1 right
    m = run_evaluate(table, [0, 1, 2, 3], labels, "class", ["a", "b", "c"])
    assert m["test/accuracy"] == pytest.approx(0.5)
    # a: tp 1, predicted 2, support 1; b: tp 1, predicted 1, support 2; c: tp 0, predicted 1, support 1
    assert (m["test/precision/a"], m["test/recall/a"], m["test/f1/a"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert (m["test/precision/b"], m["test/recall/b"], m["test/f1/b"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert m["test/f1/c"] == 0.0
    assert m["test/f1_macro"] == pytest.approx(4 / 9)
    assert m["test/f1_weighted"] == pytest.approx((1 * 2 / 3 + 2 * 2 / 3 + 0) / 4)
    assert (m["test/support/a"], m["test/support/b"], m["test/support/c"]) == (1, 2, 1)
    nll = -sum(log_softmax(table[i], y) for i, y in enumerate(labels)) / 4
    assert m["test/loss"] == pytest.approx(nll)


def test_multi_label_report_by_hand() -> None:
    table = [[2.0, -1.0], [-1.0, 3.0], [0.5, 0.5]]  # predicted sets: {x}, {y}, {x, y}
    labels = [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    m = run_evaluate(table, [0, 1, 2], labels, "multi_label", ["x", "y"])
    assert m["test/subset_accuracy"] == pytest.approx(1 / 3)
    assert m["test/hamming_loss"] == pytest.approx(2 / 6)
    assert (m["test/precision/x"], m["test/recall/x"]) == pytest.approx((0.5, 0.5))
    assert m["test/f1/y"] == pytest.approx(1.0)
    assert m["test/f1_micro"] == pytest.approx(0.75)  # tp 3, predicted 4, true 4

    def bce(z: float, t: float) -> float:
        return -(t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z))))

    assert m["test/loss"] == pytest.approx(
        sum(bce(z, t) for row, targets in zip(table, labels) for z, t in zip(row, targets)) / 6
    )


def test_regression_metrics_by_hand() -> None:
    m = run_evaluate([[1.0], [2.0], [4.0]], [0, 1, 2], [1.0, 3.0, 3.0], "regression", [])
    assert m["test/mse"] == pytest.approx(2 / 3)
    assert m["test/mae"] == pytest.approx(2 / 3)
    assert m["test/rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert m["test/pearson"] == pytest.approx(24 / math.sqrt(24 * 42))


def test_collator_label_dtypes() -> None:
    collate = TextCollator(pad_id=0)
    assert collate(dataset([1, 2], [0, 2]))["labels"].dtype == torch.long
    numbers = collate(dataset([1, 2], [0.5, -1.0]))
    assert numbers["targets"].dtype == torch.float32 and numbers["targets"].tolist() == [0.5, -1.0]
    batch = collate(dataset([1, 2], [[1.0, 0.0], [0.0, 0.0]]))
    assert batch["labels"].shape == (2, 2)
    assert batch["input_ids"].tolist() == [[1, 0], [2, 7]]  # right-padded with the pad id
    assert batch["attention_mask"].tolist() == [[1, 0], [1, 1]]


def config(train: str, terms: list[dict] | None = None, **data: object) -> TrainConfig:
    loss = {"loss": {"terms": terms}} if terms is not None else {}
    return TrainConfig(task="sequence_classification", output_dir="unused", data={"train": train, **data}, **loss)


@pytest.mark.parametrize(
    ("label", "kind"), [("pos", "class"), (2, "class"), (1.5, "regression"), (["a", "b"], "multi_label")]
)
def test_label_type_from_the_first_record(tmp_path: Path, label: object, kind: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "t", "label": label}) + "\n")
    assert detect_label_type(config(str(path))) == kind
    assert detect_label_type(config(str(path), label_type="regression")) == "regression"


def test_default_loss_and_terms_that_need_other_inputs() -> None:
    plan = plan_loss(config("unused", label_type="class"))
    assert plan.is_default and plan.terms == [{"name": "cross_entropy"}] and "default" in plan.note
    for terms, needs in (([{"name": "bradley_terry"}], "rewards_chosen"), ([{"name": "mse"}], "predictions")):
        with pytest.raises(UserError, match=f"{terms[0]['name']}.*needs.*{needs}"):  # before any model is loaded
            plan_loss(config("unused", terms, label_type="class"))


def test_unknown_labels_name_the_record() -> None:
    with pytest.raises(UserError, match=r"^val.jsonl:3: field 'label': unknown label 'maybe'"):
        target("class", SimpleNamespace(label="maybe"), {"no": 0, "yes": 1}, Source("val.jsonl", 3))
    with pytest.raises(UserError, match=r"^val.jsonl:4: .*class id 2 is outside 0..1"):
        target("class", SimpleNamespace(label=2), {"no": 0, "yes": 1}, Source("val.jsonl", 4))
    assert target("multi_label", SimpleNamespace(label=["yes"]), {"no": 0, "yes": 1}, Source("f", 1)) == [0.0, 1.0]


def test_a_regression_target_of_minus_100_is_a_trained_item() -> None:
    """The Trainer counts the entries of ``labels`` that are not -100 as the trained items
    (``num_items_in_batch``); a regression target of -100.0 is a number like any other: it is
    trained, and counted, so the mse of the batch is its plain mean."""
    from losslab.losses.registry import build_composite
    from losslab.train.adapter import LossAdapter
    from losslab.train.tasks.sequence_classification import make_forward

    batch = TextCollator(pad_id=0)(dataset([0, 1], [-100.0, 2.0]))
    num_items_in_batch = batch["labels"].ne(-100).sum()  # as Trainer.get_batch_samples counts
    assert int(num_items_in_batch) == 2
    model = FirstTokenHead([[-99.0], [4.0]]).train()  # squared errors 1 and 4
    loss_func = LossAdapter(build_composite([{"name": "mse"}]), make_forward("regression"), model=model)
    assert float(loss_func.compute_loss(model, batch, num_items_in_batch=num_items_in_batch)) == pytest.approx(2.5)
