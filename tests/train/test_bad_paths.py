"""Every path and template a train config or a compare study names, given bad: exit 2 naming the
file, line and field (or the template's own file and line), before any training; and a study's
metric names are checked against what its task produces, before the first run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import losslab.compare.study
import losslab.train.run
from losslab.cli import main

TRAIN = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input must be reported before training (or a study) starts."""

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started before the bad input was reported")

    monkeypatch.setattr(losslab.train.run, "train", boom)
    monkeypatch.setattr(losslab.compare.study, "compare", boom)


def _files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN), encoding="utf-8")
    (tmp_path / "dir").mkdir()
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}", encoding="utf-8")
    return {
        "train": str(tmp_path / "train.jsonl"),
        "dir": str(tmp_path / "dir"),
        "file": str(tmp_path / "afile"),
        "missing": str(tmp_path / "missing.jsonl"),
        "under_file": str(tmp_path / "afile" / "sub"),
        "bad_template": str(tmp_path / "bad.jinja"),
    }


def _train_config(files: dict[str, str], tmp_path: Path, **changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "task": "sequence_classification",
        "model": "builtin:tiny-llama",
        "output_dir": str(tmp_path / "out"),
        "data": {"train": files["train"]},
        "training": {"max_steps": 1},
        "eval": {"splits": ["test"]},
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            config[section][field] = value.format(**files)
        else:
            config[section] = value.format(**files)
    return config


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


# (dotted field, bad value, what the message says besides the field)
PATH_CASES = [
    ("output_dir", "{file}", "exists and is not a folder"),
    ("output_dir", "{under_file}", "is a file, not a folder"),
    ("output_dir", "", "empty path"),
    ("data.train", "{missing}", "data file not found"),
    ("data.train", "{dir}", "data file not found"),
    ("data.train", "", "an empty name"),
    ("data.validation", "{missing}", "data file not found"),
    ("data.test", "{dir}", "data file not found"),
    ("data.template", "{missing}", "chat template file not found"),
    ("data.template", "{dir}", "chat template file not found"),
    ("data.template", "{bad_template}", "bad.jinja:2: invalid Jinja chat template: unexpected '}'"),
]


@pytest.mark.parametrize(("field", "value", "expected"), PATH_CASES, ids=[f"{f}={v!r}" for f, v, _ in PATH_CASES])
def test_bad_path_in_a_train_config_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_training: None, field: str, value: str, expected: str
) -> None:
    files = _files(tmp_path)
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(_train_config(files, tmp_path, **{field: value}), sort_keys=False), encoding="utf-8"
    )
    code, err = _run(["train", str(config)], capsys)
    assert code == 2, err
    assert f"{config}:" in err and repr(field) in err and expected in err, err


@pytest.mark.parametrize("model", ["{dir}", "{file}", "{missing}", ""])
def test_bad_model_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture, model: str) -> None:
    files = _files(tmp_path)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(_train_config(files, tmp_path, model=model)), encoding="utf-8")
    code, err = _run(["train", str(config)], capsys)
    assert code == 2 and f"model {model.format(**files)!r}" in err or "model path" in err, err


STUDY = {
    "base_config": "train.yaml",
    "output_dir": "study",
    "variants": [{"name": "ce"}],
    "seeds": [0],
    "metrics": [{"name": "test/accuracy"}],
}


def _study(tmp_path: Path, files: dict[str, str], base: dict[str, Any] | None = None, **changes: Any) -> Path:
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(base or _train_config(files, tmp_path)), encoding="utf-8")
    path = tmp_path / "study.yaml"
    study = {**STUDY, "output_dir": str(tmp_path / "study"), **changes}
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"output_dir": "{file}"}, "field 'output_dir': '{file}' exists and is not a folder"),
        ({"output_dir": "{under_file}"}, "field 'output_dir'"),
        ({"base_config": "{dir}"}, "field 'base_config': config file not found"),
        ({"metrics": [{"name": "validation/telepathy"}]}, "metric 'validation/telepathy' is not produced"),
        ({"metrics": [{"name": "test/accuracy"}, {"name": "test/acuracy"}]}, "field 'metrics.1.name'"),
        (
            {"metrics": [{"name": "test/f1_micro"}]},
            "test/accuracy, test/f1/*, test/f1_macro",
        ),  # lists what it does produce
        ({"metrics": [{"name": "train/stepz"}]}, "train/steps"),
        (
            {
                "variants": [{"name": "ce", "tune": {"training.lr": {"low": 1e-4, "high": 1e-3}}}],
                "tuning": {"metric": "validation/acc"},
                "metrics": [{"name": "test/accuracy"}],
            },
            "field 'tuning.metric'",
        ),
    ],
)
def test_bad_study_exits_2_before_the_first_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_training: None, changes: dict[str, Any], expected: str
) -> None:
    files = _files(tmp_path)
    changes = {k: v.format(**files) if isinstance(v, str) else v for k, v in changes.items()}
    base = _train_config(files, tmp_path, **{"data.validation": "{train}"})
    base["eval"]["splits"] = ["validation", "test"]
    study = _study(tmp_path, files, base, **changes)
    code, err = _run(["compare", str(study)], capsys)
    assert code == 2, err
    assert expected.format(**files) in err and str(study) in err, err


def test_a_study_of_produced_metrics_reaches_the_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_training: None
) -> None:
    """The control of the test above: per-class names (test/f1/x) and train/steps pass the check."""
    files = _files(tmp_path)
    study = _study(tmp_path, files, metrics=[{"name": "test/accuracy"}, {"name": "test/f1/x"}, {"name": "train/steps"}])
    with pytest.raises(AssertionError, match="training started"):
        main(["compare", str(study)])


def test_bad_template_in_a_study_base_names_the_template_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_training: None
) -> None:
    files = _files(tmp_path)
    base = _train_config(files, tmp_path, **{"data.template": "{bad_template}"})
    code, err = _run(["compare", str(_study(tmp_path, files, base))], capsys)
    assert code == 2 and "bad.jinja:2: invalid Jinja chat template" in err and "'data.template'" in err, err
