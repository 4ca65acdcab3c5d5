"""Statistics of a study against hand-computed values and known cases."""

from __future__ import annotations

import numpy as np
import pytest

from losslab.compare.stats import sign_flip_test, significance_mark, summarize


def test_summary_mean_std_and_ci_by_hand() -> None:
    s = summarize([1.0, 2.0, 6.0], n_bootstrap=4000)
    assert s.n == 3 and s.mean == pytest.approx(3.0)
    assert s.std == pytest.approx(np.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))  # sqrt(7)
    # the bootstrap means lie between min and max; the 95% interval brackets the mean
    assert 1.0 <= s.ci_low < 3.0 < s.ci_high <= 6.0
    assert summarize([5.0]).to_dict() == {"n": 1, "mean": 5.0, "std": 0.0, "ci_low": 5.0, "ci_high": 5.0}
    assert summarize([float("nan"), 2.0]).n == 1
    assert summarize([]).n == 0


def test_summary_is_seeded() -> None:
    assert summarize([0.1, 0.5, 0.2, 0.9]) == summarize([0.1, 0.5, 0.2, 0.9])


def test_identical_variants_give_p_one() -> None:
    assert sign_flip_test([0.0, 0.0, 0.0]).p_value == 1.0


def test_exact_sign_flip_by_hand() -> None:
    # d = (1, 2, -0.5): mean 5/6. Of the 8 sign patterns, |mean| >= 5/6 for (+,+,+), (+,+,-)
    # [mean 7/6] and their negations: p = 4/8.
    t = sign_flip_test([1.0, 2.0, -0.5])
    assert t.p_value == pytest.approx(0.5) and t.mean_diff == pytest.approx(5 / 6)
    assert t.method.startswith("exact")
    # all of one sign: p = 2 / 2^n, the smallest possible
    assert sign_flip_test([0.3, 0.1, 0.2]).p_value == pytest.approx(2 / 8)


def test_planted_difference_is_significant_and_noise_is_not() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.1, size=8)
    assert sign_flip_test(list(1.0 + noise)).p_value < 0.05  # planted +1 over 8 seeds: p = 2/256
    assert sign_flip_test(list(noise)).p_value > 0.05  # pure noise (this draw: p = 0.156)
    many = sign_flip_test(list(0.5 + rng.normal(0, 0.1, size=20)))  # Monte Carlo branch
    assert many.p_value < 0.001 and "random" in many.method


def test_marks_follow_direction() -> None:
    assert significance_mark(0.01, +0.2, 0.05) == "▲"
    assert significance_mark(0.01, -0.2, 0.05) == "▼"
    assert significance_mark(0.2, +0.2, 0.05) == ""
    assert significance_mark(float("nan"), 1.0, 0.05) == ""


def test_config_hash_follows_the_contents_of_data_files(tmp_path) -> None:
    """An edited data file makes a new run; builtin data and output_dir do not enter."""
    from losslab.compare.config import config_hash

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n')
    config = {"task": "sequence_classification", "data": {"train": str(data), "test": "builtin:sentiment"}}
    first = config_hash(config)
    assert config_hash({**config, "output_dir": "elsewhere"}) == first
    data.write_text('{"text": "b c", "label": "x"}\n')
    assert config_hash(config) != first
    builtin = {"task": "causal_lm", "data": {"train": "builtin:chitchat"}}
    assert config_hash(builtin) == config_hash(dict(builtin))


def test_config_hash_is_taken_with_every_default_filled_in() -> None:
    """A setting spelled out at its default (in any spelling YAML gives) is the same run; any
    other value, or a default that changes between versions, is a new one."""
    from losslab.compare import config as compare_config
    from losslab.compare.config import config_hash
    from losslab.train.config import TrainConfig

    base = {"task": "causal_lm", "data": {"train": "builtin:chitchat"}}
    default_lr = TrainConfig.model_validate({**base, "output_dir": "."}).training.lr
    assert config_hash({**base, "training": {"lr": default_lr}}) == config_hash(base)
    assert config_hash({**base, "training": {"lr": str(default_lr)}}) == config_hash(base)
    assert config_hash({**base, "training": {"lr": default_lr * 2}}) != config_hash(base)

    class NewDefaults(TrainConfig):  # a later version with another default learning rate
        def __init__(self, **data):
            super().__init__(**data)
            if "lr" not in (data.get("training") or {}):
                self.training.lr = default_lr * 2

    original = compare_config.TrainConfig
    before = config_hash(base)
    try:
        compare_config.TrainConfig = NewDefaults
        assert config_hash(base) != before
        assert config_hash({**base, "training": {"lr": default_lr}}) == before
    finally:
        compare_config.TrainConfig = original
