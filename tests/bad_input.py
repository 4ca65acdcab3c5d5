"""Shared by the bad-input tests of every folder (tests/*/test_bad_input.py), which together sweep
bad input with a test matrix and property-based fuzzing of every loader, collator and config.

Every bad input must end in one of two ways: a :class:`UserError` naming the file, the line
(or record index) and the field (``losslab train`` / ``compare``: exit status 2, one message,
no traceback, before a model is loaded), or, with ``on_error: skip``, a counted skip listed as
``file:line: reason``. Valid-but-odd input (control characters, empty strings, a byte-order
mark) must be accepted and kept as it is. Figures: docs/reliability.md, "Bad input".
The ``no_model`` fixture is in tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from losslab.cli import main

FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
GOOD = {
    "chat": CHAT,
    "instruction": {"instruction": "Say hi", "input": "", "output": "hi"},
    "classification": {"text": "nice", "label": "pos"},
    "regression": {"text": "nice", "label": 1.5},
    "ner": {"tokens": ["Ann", "runs"], "tags": ["B-PER", "O"]},
    "preference": {"prompt": "Say hi", "chosen": "hi", "rejected": "go away", "margin": 1.0},
}

# JSON values of any shape, for the fuzzers of records and configs
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=8,
)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


# ---- a train config file, for the matrix of bad train and compare configs ----------------------

BASE_CONFIG = """\
task: sequence_classification
model: builtin:tiny-llama
output_dir: {out}
data:
  train: {train}
"""


def config_file(tmp_path: Path, change: str) -> Path:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]))
    text = BASE_CONFIG.format(out=tmp_path / "out", train=train)
    if change == "data.train":
        text = text.replace(str(train), str(tmp_path / "missing.jsonl"))
    elif change.startswith("data:\n"):
        text = text.replace("data:\n", change)
    else:
        text += change
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err
