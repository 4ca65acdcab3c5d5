"""Config loading: safe YAML, --set overrides, errors naming file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field

from losslab.config import apply_overrides, load_config, load_yaml
from losslab.errors import UserError

from .bad_input import FUZZ


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-3, gt=0)
    steps: int = 10


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    training: Inner = Field(default_factory=Inner)
    terms: list[dict] = Field(default_factory=list)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_loads_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\ntraining:\n  lr: 0.1\nterms:\n  - {name: x, weight: 1}\n")
    cfg = load_config(Outer, path, ["training.steps=3", "name=b", "terms.0.weight=0.5", "training.lr=1e-4"])
    assert (cfg.name, cfg.training.steps, cfg.training.lr, cfg.terms[0]["weight"]) == ("b", 3, 1e-4, 0.5)


def test_unknown_key_names_file_line_field(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\ntraining:\n  lr: 0.1\n  stepz: 3\n")
    with pytest.raises(UserError) as info:
        load_config(Outer, path)
    assert f"{path}:4: field 'training.stepz': unknown key" in str(info.value)
    assert f"the keys are the fields of {Outer.__module__}.Outer" in str(info.value)


def test_out_of_range_value(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\ntraining:\n  lr: -1\n")
    with pytest.raises(UserError, match=r"c.yaml:3: field 'training.lr': Input should be greater than 0"):
        load_config(Outer, path)


def test_missing_required_field(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"field 'name': Field required"):
        load_config(Outer, write(tmp_path, "training: {lr: 1}\n"))


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"c.yaml:3: invalid YAML"):
        load_config(Outer, write(tmp_path, "name: a\nb: c\n  d: e\n"))


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(Outer, path)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("novalue", "--set expects KEY=VALUE"),
        ("=3", "--set expects KEY=VALUE"),
        ("name.x=1", "--set name.x: cannot set 'x' inside a str"),
    ],
)
def test_bad_overrides(bad: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        apply_overrides({"name": "a"}, [bad])


def test_errors_in_overridden_values_name_the_override_not_the_file(tmp_path: Path) -> None:
    """The line of training.lr in the file holds a good value: the bad one came from --set."""
    path = write(tmp_path, "name: a\ntraining:\n  lr: 0.1\n  steps: 3\n")
    cases = {
        "training.lr=-1": "--set training.lr=-1: field 'training.lr': Input should be greater than 0",
        "bogus=1": "--set bogus=1: field 'bogus': unknown key",
        "training={lr: 0}": "--set training={lr: 0}: field 'training.lr'",
    }
    for override, message in cases.items():
        with pytest.raises(UserError) as info:
            load_config(Outer, path, [override])
        assert message in str(info.value) and str(path) not in str(info.value), str(info.value)
    with pytest.raises(UserError) as info:  # an error in the file next to a good override: the file's line
        load_config(Outer, write(tmp_path, "name: a\ntraining:\n  lr: -1\n"), ["training.steps=2"])
    assert "c.yaml:3: field 'training.lr'" in str(info.value)


def test_config_file_where_names_line_or_override(tmp_path: Path) -> None:
    from losslab.config import read_config

    path = write(tmp_path, "name: a\nterms:\n  - {name: x}\n  - {name: y}\n")
    assert read_config(path).where("terms", "1") == f"{path}:4: field 'terms.1'"
    assert read_config(path, ["terms=[{name: z}]"]).where("terms", "0") == "--set terms=[{name: z}]: field 'terms.0'"


@FUZZ
@given(st.text(max_size=80) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_fuzz_yaml_text_loads_or_is_a_user_error(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("yaml") / "cfg.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        data, lines = load_yaml(path)
    except UserError as exc:
        assert str(exc).startswith(str(path)), exc
    else:
        assert isinstance(data, dict) and all(isinstance(v, int) for v in lines.values())
