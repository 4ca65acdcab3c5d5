"""Early stopping on a real short run: training stops at the evaluation where the validation
metric has not improved for ``early_stopping_patience`` evaluations in a row, before
``max_steps``, and the best checkpoint (not the last) is the model that is saved and evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from losslab.train.config import TrainConfig
from losslab.train.run import train

from ..conftest import train_config

MAX_STEPS = 30
PATIENCE = 2


def expected_stop(series: list[tuple[int, float]], patience: int) -> tuple[int, int, float]:
    """(stop step, best step, best value) of a lower-is-better series by the early-stopping rule:
    stop at the ``patience``-th evaluation in a row that is not strictly better than the best."""
    best_step, best = series[0]
    misses = 0
    for step, value in series[1:]:
        if value < best:
            best_step, best, misses = step, value, 0
        else:
            misses += 1
            if misses == patience:
                return step, best_step, best
    raise AssertionError(f"the run never stopped improving: {series}")


def early_stopping_config(out: Path) -> TrainConfig:
    # lr 3e-2 on 8 fixed samples: the validation loss falls, bounces and then rises (overshoot/overfit)
    return TrainConfig(
        **train_config(
            out,
            validation=True,
            data={"max_train_samples": 8, "max_eval_samples": 8},
            training={
                "max_steps": MAX_STEPS,
                "batch_size": 8,
                "lr": 3e-2,
                "scheduler": "constant",
                "eval_steps": 1,
                "early_stopping_patience": PATIENCE,
            },
        )
    )


def train_one_thread(config: TrainConfig, **kwargs) -> dict[str, float]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config, **kwargs)
    finally:
        torch.set_num_threads(before)


def eval_series(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """One uninterrupted run (its folder and metrics), shared by the tests of this module: they only read it."""
    out = tmp_path_factory.mktemp("early_stopping") / "straight"
    return out, train_one_thread(early_stopping_config(out))


def test_early_stopping_stops_at_the_right_evaluation_and_keeps_the_best(straight_run) -> None:
    out, metrics = straight_run
    series = eval_series(out)
    assert [s for s, _ in series] == list(range(1, len(series) + 1))  # one evaluation per step
    stop, best_step, best = expected_stop(series, PATIENCE)
    assert stop < MAX_STEPS and best_step < stop  # it stopped early, and the best is not the last
    assert series[-1][0] == stop and metrics["train/steps"] == stop  # no step after the stopping evaluation

    state = json.loads((out / f"checkpoint-{stop}" / "trainer_state.json").read_text())
    assert state["best_metric"] == pytest.approx(best, rel=1e-9)
    assert Path(state["best_model_checkpoint"]).name == f"checkpoint-{best_step}"
    # load_best_model_at_end: the saved model is the best checkpoint's weights, and the final
    # validation loss (exact token CE over the same 8 samples, one eval batch) is the best one
    best_weights = load_file(out / f"checkpoint-{best_step}" / "model.safetensors")
    final_weights = load_file(out / "model" / "model.safetensors")
    last_weights = load_file(out / f"checkpoint-{stop}" / "model.safetensors")
    assert best_weights.keys() == final_weights.keys()
    assert all(torch.equal(best_weights[k], final_weights[k]) for k in best_weights)
    assert not all(torch.equal(last_weights[k], final_weights[k]) for k in last_weights)
    assert metrics["validation/loss"] == pytest.approx(best, rel=1e-5)
    assert metrics["validation/loss"] != pytest.approx(series[-1][1], rel=1e-3)


def test_a_resumed_run_keeps_its_patience_count(tmp_path: Path, straight_run) -> None:
    """Killed at an evaluation while early stopping had already counted a miss, then rerun: the
    run resumes from the checkpoint before and stops at the same step as an uninterrupted run
    (the count of evaluations without improvement is restored, not reset to 0)."""
    straight, expected = straight_run
    series = eval_series(straight)
    stop = int(expected["train/steps"])
    counted = stop - 1  # its evaluation was the (PATIENCE - 1)-th miss in a row, its checkpoint holds that count
    assert PATIENCE > 1 and series[counted - 1][1] >= min(v for _, v in series[: counted - 1]), series

    class Killed(Exception):
        pass

    def kill(step: int, validation_metrics) -> None:
        if step == counted + 1:
            raise Killed  # before that step's checkpoint is saved

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train_one_thread(early_stopping_config(out), on_evaluate=kill)
    assert (out / f"checkpoint-{counted}").is_dir() and not (out / f"checkpoint-{counted + 1}").exists()
    metrics = train_one_thread(early_stopping_config(out))
    assert metrics["train/steps"] == stop
    assert metrics["validation/loss"] == pytest.approx(expected["validation/loss"], rel=1e-5)
