"""``training.report_to: [tensorboard]``: every loss term, its weight and the eval terms are
scalars in the event files, with the values and steps of log.jsonl."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from losslab.config import load_config
from losslab.errors import UserError
from losslab.train.config import TrainConfig
from losslab.train.run import train

from ..conftest import train_config


def test_every_loss_term_is_a_tensorboard_scalar(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    config = TrainConfig(
        **train_config(
            out,
            validation=True,
            data={"max_train_samples": 8, "max_eval_samples": 4},
            loss={
                "terms": [
                    {"name": "token_cross_entropy"},
                    {"name": "consistency", "weight": {"schedule": "linear", "start": 0.2, "end": 0.0}},
                ]
            },
            training={"max_steps": 4, "eval_steps": 2, "report_to": ["tensorboard"]},
        )
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config)
    finally:
        torch.set_num_threads(before)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    logged: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if "/" in key and isinstance(value, float | int):  # loss/X, weight/X, eval_loss/X
                logged.setdefault(key, {})[row["step"]] = value
    expected_keys = {
        "loss/token_cross_entropy",
        "loss/consistency",
        "weight/token_cross_entropy",
        "weight/consistency",
        "eval_loss/token_cross_entropy",
        "eval_loss/consistency",
    }
    assert expected_keys <= set(logged)

    (run_dir,) = (out / "runs").iterdir()  # transformers' default: output_dir/runs/DATE_HOST
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key, by_step in logged.items():
        # the Trainer's TensorBoard callback names eval keys eval/X, the others train/X
        tag = "eval/" + key.removeprefix("eval_") if key.startswith("eval_") else "train/" + key
        assert tag in tags, (tag, sorted(tags))
        scalars = {e.step: e.value for e in events.Scalars(tag)}
        assert scalars.keys() == by_step.keys(), tag
        for step, value in by_step.items():
            assert scalars[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
    assert sorted(logged["loss/consistency"]) == [1, 2, 3, 4] and sorted(logged["eval_loss/consistency"]) == [2, 4]


def test_report_to_tensorboard_without_tensorboard_is_a_config_error(tmp_path: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    path = tmp_path / "train.yaml"
    path.write_text(
        "output_dir: out\ndata: {train: builtin:chatterbot}\ntraining:\n  max_steps: 2\n  report_to: [tensorboard]\n"
    )
    with pytest.raises(UserError) as err:
        load_config(TrainConfig, path)
    message = str(err.value)
    assert "report_to" in message and "pip install tensorboard" in message and "train.yaml" in message
