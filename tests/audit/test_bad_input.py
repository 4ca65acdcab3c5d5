"""Bad input to ``losslab audit``: exit 2, one message naming the file and line (and the field),
no traceback, no report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from losslab.cli import main

from .conftest import CHITCHAT, own_labels, write_jsonl

RECORDS = [json.loads(line) for line in CHITCHAT.read_text(encoding="utf-8").splitlines()][:3]


def bad(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["audit", *args, "--workers", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    return err


@pytest.fixture
def files(tmp_path: Path, smollm2_tokenizer):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    rows = own_labels(smollm2_tokenizer, RECORDS)
    return data, rows, tmp_path / "labels.jsonl"


def test_labels_lengths_differ(files, capsys) -> None:
    data, rows, labels = files
    rows[1]["labels"] = rows[1]["labels"][:-2]
    write_jsonl(labels, rows)
    err = bad(capsys, str(data), "--labels", str(labels))
    n = len(rows[1]["input_ids"])
    assert f"{labels}:2: field 'labels': {n - 2} values for {n} input_ids" in err


def test_ids_outside_the_vocabulary(files, capsys) -> None:
    data, rows, labels = files
    rows[2]["input_ids"][5] = 49152
    write_jsonl(labels, rows)
    err = bad(capsys, str(data), "--labels", str(labels))
    assert f"{labels}:3: field 'input_ids[5]': token id 49152 is outside the tokenizer's vocabulary (0..49151)" in err


def test_label_value_outside_the_vocabulary(files, capsys) -> None:
    data, rows, labels = files
    rows[0]["labels"][3] = -7
    write_jsonl(labels, rows)
    assert f"{labels}:1: field 'labels[3]': -7 is neither -100 nor a token id" in bad(
        capsys, str(data), "--labels", str(labels)
    )


def test_labels_line_does_not_parse(files, capsys) -> None:
    data, rows, labels = files
    write_jsonl(labels, rows)
    lines = labels.read_text().splitlines()
    lines[1] = lines[1][:-3]
    labels.write_text("\n".join(lines) + "\n")
    assert f"{labels}:2: invalid JSON" in bad(capsys, str(data), "--labels", str(labels))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"labels": [1]}, "field 'input_ids' is missing"),
        ({"input_ids": [1, 2]}, "none of the fields labels, assistant_masks, completion_mask"),
        ({"input_ids": [1, 2], "assistant_masks": [0, 2]}, "field 'assistant_masks[1]': 2 is not 0 or 1"),
        ({"input_ids": [1, 2.5], "labels": [1, 2]}, "field 'input_ids[1]': expected an integer, got 2.5"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_labels_line_with_a_bad_field(files, capsys, row, message) -> None:
    data, rows, labels = files
    rows[1] = row
    write_jsonl(labels, rows)
    assert f"{labels}:2: {message}" in bad(capsys, str(data), "--labels", str(labels))


def test_fewer_label_lines_than_records(files, capsys) -> None:
    data, rows, labels = files
    write_jsonl(labels, rows[:2])
    err = bad(capsys, str(data), "--labels", str(labels))
    assert f"{data}:3: no labels line for this record: {labels} has 2 lines for 3 records" in err


def test_more_label_lines_than_records(files, capsys) -> None:
    data, rows, labels = files
    write_jsonl(labels, [*rows, rows[0]])
    assert f"{labels}:4: a labels line with no record: {data} has 3 records" in bad(
        capsys, str(data), "--labels", str(labels)
    )


def test_limit_reads_as_many_label_lines(files, capsys) -> None:
    data, rows, labels = files
    write_jsonl(labels, rows[:2])
    assert main(["audit", str(data), "--labels", str(labels), "--limit", "2", "--workers", "1"]) == 0


def test_bad_record_in_the_data(tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [RECORDS[0], {"messages": [{"role": "robot", "content": "x"}]}])
    assert f"{data}:2: field 'messages.0.role'" in bad(capsys, str(data))


def test_config_audit_missing_is_a_clear_error(tmp_path: Path, capsys, monkeypatch) -> None:
    import importlib

    real = importlib.import_module

    def without_training(name: str, *args):
        if name == "losslab.audit.training":
            raise ModuleNotFoundError(name=name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_training)
    config = tmp_path / "run.yaml"
    config.write_text("task: causal_lm\n")
    assert main(["audit", str(config)]) == 2  # (no --workers: a records-only option, refused for a config)
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and "auditing a train/compare config" in err


def test_records_only_options_are_refused_for_a_config(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("task: causal_lm\n")
    for option in (["--labels", str(config)], ["--mask", "last"], ["--limit", "3"], ["--workers", "1"]):
        assert main(["audit", str(config), *option]) == 2
        out, err = capsys.readouterr()
        assert out == "" and f"argument {option[0]}: applies to a records audit only" in err
