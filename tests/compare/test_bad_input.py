"""Bad study configs through ``losslab compare``: exit 2 naming the study file (or its base config),
the line and the field, before any run. The contract: tests/bad_input.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..bad_input import config_file, run_cli

# ---- compare configs ----------------------------------------------------------------------------

STUDY = """\
base_config: train.yaml
output_dir: {out}
variants:
  - name: ce
    overrides: {{}}
seeds: [0]
metrics:
  - name: train/steps
"""
COMPARE_CASES: list[tuple[str, str, str]] = [
    ("seeds: [0]\n", "seeds: []\n", "'seeds'"),
    ("seeds: [0]\n", "seeds: [0, 0]\n", "seeds must be distinct"),
    ("seeds: [0]\n", "seeds: [-1]\n", "'seed'"),
    ("    overrides: {}\n", "    overrides: {training.lr: -1}\n", "'training.lr'"),
    ("    overrides: {}\n", "    overrides: {loss.terms: [{name: nope}]}\n", "unknown loss 'nope'"),
    ("    overrides: {}\n", "    overrides: {training.warmup: 2.5}\n", "'training.warmup'"),
    (
        "    overrides: {}\n",
        "    overrides: {}\n    tune: {training.lr: {low: .nan, high: 1}}\n",
        "'variants.0.tune.training.lr.low'",
    ),
    ("    overrides: {}\n", "    overrides: {}\n    tune: {training.lr: {low: 1, high: 0}}\n", "low"),
    ("    overrides: {}\n", "    overrides: {}\n    colour: red\n", "'variants.0.colour'"),
    ("  - name: ce\n", "  - name: c/e\n", "'variants.0.name'"),
    ("metrics:\n", "stats:\n  confidence: 1.5\nmetrics:\n", "'stats.confidence'"),
    ("metrics:\n", "stats:\n  n_bootstrap: 10\nmetrics:\n", "'stats.n_bootstrap'"),
    ("metrics:\n", "tuning:\n  trials: 0\nmetrics:\n", "'tuning.trials'"),
    ("  - name: train/steps\n", "  - name: train/steps\n    direction: up\n", "'metrics.0.direction'"),
    ("base_config: train.yaml\n", "base_config: missing.yaml\n", "config file not found"),
    ("base_config: train.yaml\n", "base_config: train.yaml\nbase: {task: causal_lm}\n", "exactly one of"),
]


@pytest.mark.parametrize(
    ("old", "new", "expected"), COMPARE_CASES, ids=[f"compare-{i}" for i in range(len(COMPARE_CASES))]
)
def test_bad_compare_config_exits_2(tmp_path: Path, capsys, no_model, old: str, new: str, expected: str) -> None:
    train_cfg = config_file(tmp_path, "")
    (tmp_path / "train.yaml").write_text(train_cfg.read_text(encoding="utf-8"), encoding="utf-8")
    study = tmp_path / "study.yaml"
    text = STUDY.format(out=tmp_path / "study_out")
    assert old in text
    study.write_text(text.replace(old, new, 1), encoding="utf-8")
    code, err = run_cli(["compare", str(study)], capsys)
    assert code == 2 and str(study) in err or "train.yaml" in err, err
    assert expected in err, err
    assert not (tmp_path / "study_out").exists()
