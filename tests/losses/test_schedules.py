"""Weight schedules: values at chosen steps, warmup, and config errors."""

from __future__ import annotations

import math

import pytest

from losslab.errors import UserError
from losslab.losses.schedules import (
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    StepSchedule,
    build_schedule,
    build_weight,
    weight_at,
)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (ConstantSchedule(start=0.5), {0: 0.5, 10: 0.5, 10**6: 0.5}),
        (ConstantSchedule(start=0.5, warmup_steps=4), {0: 0.0, 1: 0.125, 2: 0.25, 4: 0.5, 99: 0.5}),
        (ConstantSchedule(start=1.0, warmup_steps=2, warmup_start=0.5), {0: 0.5, 1: 0.75, 2: 1.0}),
        (LinearSchedule(start=0.7, end=0.1, total_steps=6), {0: 0.7, 3: 0.4, 6: 0.1, 60: 0.1}),
        (
            LinearSchedule(start=0.7, end=0.1, total_steps=12, warmup_steps=2),
            {0: 0.0, 1: 0.35, 2: 0.7, 7: 0.4, 12: 0.1},
        ),
        (LinearSchedule(start=0.0, end=1.0, total_steps=4), {1: 0.25, 2: 0.5, 5: 1.0}),
        (
            CosineSchedule(start=1.0, end=0.0, total_steps=4),
            {0: 1.0, 1: (1 + math.cos(math.pi / 4)) / 2, 2: 0.5, 4: 0.0, 9: 0.0},
        ),
        (CosineSchedule(start=0.7, end=0.1, total_steps=110, warmup_steps=10), {5: 0.35, 10: 0.7, 60: 0.4, 110: 0.1}),
        (StepSchedule(start=1.0, gamma=0.5, step_size=10), {0: 1.0, 9: 1.0, 10: 0.5, 25: 0.25}),
        (StepSchedule(start=1.0, gamma=0.1, milestones=(5, 8)), {4: 1.0, 5: 0.1, 7: 0.1, 8: 0.01}),
        (StepSchedule(start=1.0, gamma=0.1, step_size=1, end=0.05), {0: 1.0, 1: 0.1, 2: 0.05, 50: 0.05}),
        (StepSchedule(start=0.1, gamma=2.0, step_size=1, end=0.3), {1: 0.2, 2: 0.3, 3: 0.3}),
        (StepSchedule(start=1.0, gamma=0.5, milestones=(6,), warmup_steps=4), {2: 0.5, 4: 1.0, 6: 0.5}),
    ],
    ids=lambda v: getattr(v, "kind", ""),
)
def test_values_at_chosen_steps(schedule, expected):
    for step, value in expected.items():
        assert schedule(step) == pytest.approx(value, abs=1e-12), step


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match="step must be >= 0"):
        ConstantSchedule(start=1.0)(-1)


def test_build_from_config_and_total_steps_from_the_trainer():
    cosine = build_schedule({"schedule": "cosine", "start": 0.7, "end": 0.1, "warmup_steps": 10}, total_steps=110)
    assert cosine == CosineSchedule(start=0.7, end=0.1, warmup_steps=10, total_steps=110)
    own = build_schedule({"schedule": "linear", "start": 1, "end": 0, "total_steps": 4}, total_steps=1000)
    assert own(2) == 0.5  # the config's own total_steps wins
    step = build_schedule({"schedule": "step", "start": 1.0, "milestones": [2, 4]})
    assert step(3) == pytest.approx(0.1) and step.milestones == (2, 4)
    assert build_weight(0.3) == 0.3 and weight_at(0.3, 99) == 0.3
    assert weight_at(build_weight({"schedule": "constant", "start": 2.0, "warmup_steps": 2}), 1) == 1.0


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"schedule": "exponential", "start": 1},
            "unknown schedule 'exponential'; allowed: constant, linear, cosine, step",
        ),
        ({"start": 1}, "unknown schedule None; allowed: constant"),
        (
            {"schedule": "cosine", "start": 1, "end": 0, "total_steps": 9, "warmup": 3},
            "unknown key(s) warmup; allowed: schedule, start, warmup_steps",
        ),
        (
            {"schedule": "cosine", "start": 1, "end": 0},
            "cosine schedule needs total_steps (or a run length from the trainer)",
        ),
        ({"schedule": "linear", "start": 1}, "linear schedule needs end, total_steps"),
        (
            {"schedule": "linear", "start": 1, "end": 0, "total_steps": 5, "warmup_steps": 5},
            "total_steps must be an integer >= 6",
        ),
        ({"schedule": "constant", "start": "high"}, "start must be a finite number"),
        ({"schedule": "constant", "start": 1, "warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ({"schedule": "step", "start": 1}, "give exactly one of step_size"),
        ({"schedule": "step", "start": 1, "step_size": 2, "milestones": [3]}, "give exactly one of step_size"),
        ({"schedule": "step", "start": 1, "step_size": 0}, "step_size must be an integer >= 1"),
    ],
)
def test_bad_configs_fail_with_what_is_allowed(config, message):
    with pytest.raises(UserError) as info:
        build_schedule(config, where="run.yaml: loss.terms[1].weight")
    assert message in str(info.value) and str(info.value).startswith("run.yaml: loss.terms[1].weight: ")


@pytest.mark.parametrize("value", ["0.5", None, [1, 2], True])
def test_bad_weights(value):
    with pytest.raises(UserError, match="must be a number or a schedule"):
        build_weight(value)
