"""Tasks come from one registry, and a task is one module (or object): a toy task defined here
trains through the same plan, adapter and Trainer as the built-in ones."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from losslab.losses.composite import LossInputs
from losslab.train import tasks
from losslab.train.config import TrainConfig
from losslab.train.run import train
from losslab.train.task import LossNeeds, LossPlan, TaskRun, get_task, plan_loss


def test_the_registry_is_the_one_list_of_tasks() -> None:
    for name in tasks.TASKS:
        task = get_task(name)
        for function in ("loss_needs", "metric_names", "build"):
            assert callable(getattr(task, function)), (name, function)
        TrainConfig(task=name, output_dir="unused", data={"train": "unused"})
    with pytest.raises(
        ValidationError, match="unknown task 'translation'; choose one of: causal_lm, sequence_classification"
    ):
        TrainConfig(task="translation", output_dir="unused", data={"train": "unused"})


def test_task_modules_import_nothing_from_the_registry() -> None:
    """The task modules import the task interface from losslab.train.task, not the registry."""
    for name, entry in tasks.TASKS.items():
        source = Path(importlib.import_module(str(entry)).__file__).read_text(encoding="utf-8")
        assert "from losslab.train.tasks import" not in source and "import losslab.train.tasks" not in source, name


class Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # (the Trainer reads the label names off this signature)
        return self.linear(x).squeeze(-1)


class ToyTask:
    """y = x . (1, -2, 0.5) + 1 from 64 noiseless samples; mse by default."""

    def loss_needs(self, config: TrainConfig) -> LossNeeds:
        return LossNeeds("toy", ({"name": "mse"},), frozenset({"predictions", "targets", "num_examples"}))

    def metric_names(self, config: TrainConfig) -> set[str]:
        return {"validation/mse"}

    def build(self, config: TrainConfig, plan: LossPlan) -> TaskRun:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 3, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5]) + 1.0
        data = [{"x": a, "y": float(b)} for a, b in zip(x, y)]

        def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.tensor([r["y"] for r in rows])}

        def forward(model: torch.nn.Module, batch: dict[str, Any]) -> LossInputs:
            return LossInputs(predictions=model(batch["x"]), targets=batch["labels"])

        def evaluate(model: torch.nn.Module, dataset: list[dict], split: str) -> dict[str, float]:
            with torch.no_grad():
                batch = collate(dataset)
                return {f"{split}/mse": float(((model(batch["x"]) - batch["labels"]) ** 2).mean())}

        torch.manual_seed(config.seed)
        return TaskRun(
            model=Regression(),
            tokenizer=None,
            train=data,
            validation=data[:16],
            test=None,
            collator=collate,
            forward=forward,
            evaluate=evaluate,
            summary={"task": "toy"},
        )


def test_a_toy_task_trains_through_the_same_adapter(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(tasks.TASKS, "toy", ToyTask())
    config = TrainConfig.model_validate(
        {
            "task": "toy",
            "output_dir": str(tmp_path / "run"),
            "data": {"train": "unused"},
            "loss": {"terms": [{"name": "mse"}, {"name": "l2", "weight": 1e-4}]},
            "training": {
                "max_steps": 40,
                "batch_size": 16,
                "lr": 0.05,
                "logging_steps": 1,
                "warmup": 0,
                "scheduler": "constant",
            },
            "eval": {"splits": ["validation"]},
        }
    )
    assert plan_loss(config).note == "mse, l2"
    with pytest.raises(Exception, match="bradley_terry.*a toy batch provides num_examples, predictions, targets"):
        plan_loss(
            config.model_copy(update={"loss": config.loss.model_copy(update={"terms": [{"name": "bradley_terry"}]})})
        )
    metrics = train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/mse" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    for r in steps:  # the total is the weighted sum of the logged terms
        assert r["loss"] == pytest.approx(r["loss/mse"] + 1e-4 * r["loss/l2"], rel=1e-4)
    assert steps[-1]["loss/mse"] < 0.1 * steps[0]["loss/mse"]
    assert metrics["validation/mse"] < 0.1 * steps[0]["loss/mse"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["loss"] == "mse, l2"
