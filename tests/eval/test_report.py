"""Metric tables and the atomic metrics.json writer."""

from __future__ import annotations

import doctest
import json
import math
import os

import numpy as np
import pytest
import torch

import losslab.eval.report as report_module
from losslab.eval.report import (
    format_metrics_markdown,
    format_metrics_table,
    format_value,
    namespace,
    read_metrics_json,
    write_metrics_json,
)

METRICS = {
    "validation/loss": 1.5,
    "validation/f1_macro": 0.5,
    "test/loss": 1.25,
    "test/bleu": 31.0,
    "test/support/PER": 7,
}


def test_text_table_pivots_splits_into_columns():
    assert format_metrics_table(METRICS).splitlines() == [
        "metric       validation     test",
        "loss             1.5000   1.2500",
        "f1_macro         0.5000        -",
        "bleu                  -  31.0000",
        "support/PER           -        7",
    ]
    assert format_metrics_table({"loss": 2.0}).splitlines() == ["metric   value", "loss    2.0000"]
    assert format_metrics_table({}) == "(no metrics)"


def test_markdown_table():
    assert format_metrics_markdown({"test/a|b": 0.25, "validation/a|b": float("nan")}).splitlines() == [
        "| metric | test | validation |",
        "|:---|---:|---:|",
        "| a\\|b | 0.2500 | nan |",
    ]


def test_format_value():
    assert format_value(3) == "3"
    assert format_value(0.123456) == "0.1235"
    assert format_value(1234567.0) == "1.235e+06"
    assert format_value(1e-7) == "1.000e-07"
    assert format_value(0.0) == "0.0000"
    assert format_value(math.inf) == "inf"
    assert format_value(None) == "-"


def test_namespace():
    assert namespace({"f1": 1.0}, "test") == {"test/f1": 1.0}
    assert namespace({"f1": 1.0}, "test/") == {"test/f1": 1.0}
    assert namespace({"f1": 1.0}, "") == {"f1": 1.0}


def test_write_metrics_json(tmp_path):
    path = tmp_path / "run" / "metrics.json"
    metrics = {
        **METRICS,
        "test/ppl": math.inf,
        "test/acc": np.float32(0.5),
        "test/n": np.int64(3),
        "test/t": torch.tensor(0.25),
    }
    assert write_metrics_json(metrics, path) == path
    data = json.loads(path.read_text())  # strict JSON: no NaN / Infinity tokens
    assert list(data) == list(metrics)
    assert data["test/ppl"] is None
    assert data["test/support/PER"] == 7 and isinstance(data["test/support/PER"], int)
    assert data["test/n"] == 3 and isinstance(data["test/n"], int)
    assert data["test/acc"] == 0.5 and data["test/t"] == 0.25
    assert read_metrics_json(path) == data
    write_metrics_json({"test/loss": 0.0}, path)  # replaces the file
    assert read_metrics_json(path) == {"test/loss": 0.0}
    assert os.listdir(path.parent) == ["metrics.json"]  # no temporary file left behind


def test_write_metrics_json_rejects_non_numbers_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_metrics_json({"a": 1.0}, path)
    with pytest.raises(TypeError, match="must be a number"):
        write_metrics_json({"a": 2.0, "b": "x"}, path)
    with pytest.raises(TypeError, match="must be a number"):
        write_metrics_json({"flag": True}, path)
    with pytest.raises(TypeError, match="must be strings"):
        write_metrics_json({1: 2.0}, path)  # type: ignore[dict-item]
    assert read_metrics_json(path) == {"a": 1.0}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_docstring_examples():
    assert doctest.testmod(report_module).failed == 0
    import losslab.eval.language_model as lm

    assert doctest.testmod(lm).failed == 0
