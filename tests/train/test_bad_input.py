"""Bad train configs and bad data through ``losslab train`` (in process and as a subprocess): exit 2
with one message naming file, line and field, before a model is loaded; skipped records listed in
summary.json; fuzzed configs. The contract: tests/bad_input.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from losslab.cli import main
from losslab.config import validate
from losslab.errors import UserError
from losslab.losses.registry import build_composite
from losslab.train.config import TrainConfig

from ..bad_input import CHAT, FUZZ, GOOD, JSON_SCALARS, JSON_VALUES, config_file, run_cli
from ..conftest import train_config

# ---- train configs: the matrix, in-process through the CLI --------------------------------------

# (what is appended to / replaced in the base config, the field named, its line)
CONFIG_CASES: list[tuple[str, str, int | None]] = [
    ("training:\n  lr: -0.1\n", "training.lr", 7),
    ("training:\n  lr: .inf\n", "training.lr", 7),
    ("training:\n  lr: .nan\n", "training.lr", 7),
    ("training:\n  lr: fast\n", "training.lr", 7),
    ("training:\n  batch_size: 0\n", "training.batch_size", 7),
    ("training:\n  batch_size: 2.5\n", "training.batch_size", 7),
    ("training:\n  grad_accum: -1\n", "training.grad_accum", 7),
    ("training:\n  warmup: 1.5\n", "training.warmup", 7),
    ("training:\n  warmup: -0.1\n", "training.warmup", 7),
    ("training:\n  epochs: .inf\n", "training.epochs", 7),
    ("training:\n  epochs: 0\n", "training.epochs", 7),
    ("training:\n  weight_decay: .inf\n", "training.weight_decay", 7),
    ("training:\n  max_grad_norm: -1\n", "training.max_grad_norm", 7),
    ("training:\n  scheduler: exponential\n", "training.scheduler", 7),
    ("training:\n  max_steps: 0\n", "max_steps", None),
    ("training:\n  max_nonfinite_steps: 0\n", "training.max_nonfinite_steps", 7),
    ("training:\n  eval_steps: 0\n", "training.eval_steps", 7),
    ("training:\n  metric_for_best_model: accuracy\n", "training.metric_for_best_model", None),
    ("training:\n  early_stopping_patience: 2\n", "training.early_stopping_patience", None),
    ("training:\n  learning_rate: 0.1\n", "training.learning_rate", 7),
    ("trainig:\n  lr: 0.1\n", "trainig", 6),
    ("seed: -1\n", "seed", 6),
    ("seed: 4294967296\n", "seed", 6),
    ("seed: 1\nseed: 2\n", "seed", 7),
    ("task: translation\n", "task", 6),
    ("dtype: float8\n", "dtype", 6),
    ("eval:\n  splits: [train]\n", "eval.splits.0", 7),
    ("eval:\n  max_new_tokens: 0\n", "eval.max_new_tokens", 7),
    ("embedding:\n  recall_at: []\n", "embedding.recall_at", 7),
    ("embedding:\n  pooling: max\n", "embedding.pooling", 7),
    ("loss:\n  chunk_size: 0\n", "loss.chunk_size", 7),
    ("loss:\n  terms: [3]\n", "loss.terms.0", 7),
    ("loss:\n  terms: {name: mse}\n", "loss.terms", 7),
    ("loss:\n  terms: [{name: cross_entropyy}]\n", "loss.terms.0", 7),
    ("loss:\n  terms: [{weight: 1}]\n", "loss.terms.0", 7),
    ("loss:\n  terms: [{name: focal, gama: 2}]\n", "loss.terms.0", 7),
    ("loss:\n  terms: [{name: focal, weight: true}]\n", "loss.terms.0", 7),
    ("loss:\n  terms: [{name: {a: 1}}]\n", "loss.terms.0", 7),
    ("loss:\n  terms: [{name: focal, weight: .nan}]\n", "loss.terms.0", 7),
    ("loss:\n  terms: [{name: focal, weight: {schedule: exponential, start: 0, end: 1}}]\n", "loss.terms.0", 7),
    ("loss:\n  terms: [{name: focal, weight: {schedule: cosine, start: 0}}]\n", "loss.terms.0", 7),
    (
        "loss:\n  terms: [{name: focal, weight: {schedule: linear, start: 0, end: 1, warmup_steps: -3}}]\n",
        "loss.terms.0",
        7,
    ),
    ("data.train", "data.train", 5),  # data file that does not exist (see _config)
    ("data:\n  max_length: 4\n", "data.max_length", 5),
    ("data:\n  max_length: 100000000000000000000000\n", "data.max_length", 5),
    ("data:\n  on_error: ignore\n", "data.on_error", 5),
    ("data:\n  truncation: middle\n", "data.truncation", 5),
    ("data:\n  num_proc: 2\n", "num_proc", None),
    ("data:\n  label_type: ordinal\n", "data.label_type", 5),
    ("data:\n  role_weights: {assistant: one}\n", "data.role_weights.assistant", 5),
    ("data:\n  max_train_samples: 0\n", "data.max_train_samples", 5),
    ("data:\n  trian: x.jsonl\n", "data.trian", 5),
]


@pytest.mark.parametrize(
    ("change", "field", "line"), CONFIG_CASES, ids=[c[1] + f"-{i}" for i, c in enumerate(CONFIG_CASES)]
)
def test_bad_train_config_exits_2_naming_file_line_field(
    tmp_path: Path, capsys, no_model, change: str, field: str, line: int | None
) -> None:
    path = config_file(tmp_path, change)
    code, err = run_cli(["train", str(path)], capsys)
    assert code == 2, err
    assert err.startswith("losslab: error: ") and err.count("\n") <= 3, err
    assert f"{path}:{line}:" in err if line else str(path) in err, err
    assert field in err, err
    assert not (tmp_path / "out").exists()  # nothing written, nothing trained


@pytest.mark.parametrize("model", ["someone/not-a-model", "./no/such/dir"])
def test_a_model_that_cannot_be_found_exits_2(tmp_path: Path, capsys, monkeypatch, model: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = config_file(tmp_path, "").read_text().replace("builtin:tiny-llama", model)
    (tmp_path / "c.yaml").write_text(path)
    code, err = run_cli(["train", str(tmp_path / "c.yaml")], capsys)
    assert code == 2 and f"model {model!r} could not be loaded" in err and "builtin:tiny-llama" in err, err


def test_set_override_errors_name_the_field(tmp_path: Path, capsys, no_model) -> None:
    path = config_file(tmp_path, "")
    for override, field in (("training.lr=-1", "training.lr"), ("training=3", "training"), ("seed=abc", "seed")):
        code, err = run_cli(["train", str(path), "--set", override], capsys)
        assert code == 2 and field in err, err
    code, err = run_cli(["train", str(path), "--set", "novalue"], capsys)
    assert code == 2 and "KEY=VALUE" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"task: causal_lm\n\xff\n", r"cfg.yaml:2: not UTF-8"),
        (b"task: [causal_lm\n", r"cfg.yaml:2: invalid YAML"),
        (b"- a list\n", r"cfg.yaml: a config must be a YAML mapping"),
        (b"", r"cfg.yaml: a config must be a YAML mapping"),
        (b"seed: !!python/object/apply:os.system [echo]\n", r"cfg.yaml:1: invalid YAML"),
        (b"data:\n  train: a\n  train: b\n", r"cfg.yaml:3: field 'data.train': key given twice \(also on line 2\)"),
    ],
)
def test_unreadable_config(tmp_path: Path, capsys, text: bytes, expected: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text)
    for command in ("train", "compare"):
        code, err = run_cli([command, str(path)], capsys)
        assert code == 2 and __import__("re").search(expected, err), err
    assert not (tmp_path / "out").exists()


# ---- data through `losslab train`, every task: exit 2 before the model is loaded ----------------

CHAT_LINE = json.dumps(CHAT)
TASK_DATA: dict[str, tuple[str, list[str]]] = {
    "causal_lm": ("", [CHAT_LINE, CHAT_LINE]),
    "sequence_classification": ("", [json.dumps({"text": "a", "label": "x"}), json.dumps({"text": "b", "label": "y"})]),
    "token_classification": (
        "",
        [json.dumps({"tokens": ["Ann"], "tags": ["B-PER"]}), json.dumps({"tokens": ["x"], "tags": ["O"]})],
    ),
    "reward_model": ("", [json.dumps(GOOD["preference"]), json.dumps(GOOD["preference"])]),
    "preference": ("", [json.dumps(GOOD["preference"]), json.dumps(GOOD["preference"])]),
    "embedding": (
        "",
        [
            CHAT_LINE,
            json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}),
        ],
    ),
}
# (task, split with the bad record, bad line, extra config, what the message names)
DATA_CASES: list[tuple[str, str, str, str, str]] = [
    ("causal_lm", "train", '{"messages": [{"role": "robot", "content": "x"}]}', "", "'messages.0.role'"),
    ("causal_lm", "train", '{"messages": [{"role": "user", "content": "x"}]}', "", "no assistant turn"),
    ("causal_lm", "train", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "", "'messages.0.content'"),
    ("causal_lm", "validation", '{"messages": [', "", "invalid JSON"),
    (
        "causal_lm",
        "train",
        '{"instruction": "x", "output": "y"}',
        "",
        "'instruction'",
    ),  # an instruction record in a chat file
    ("sequence_classification", "train", '{"text": "a", "label": 1.5}', "", "'label'"),
    ("sequence_classification", "validation", '{"text": "c", "label": "z"}', "", "unknown label 'z'"),
    ("sequence_classification", "train", '{"text": "c", "label": "z"}', "  label_names: [x, y]\n", "unknown label 'z'"),
    ("sequence_classification", "train", '{"text": "c", "label": 5}', "  label_type: class\n", "'label'"),
    ("sequence_classification", "train", '{"text": "c", "label": NaN}', "", "NaN"),
    ("sequence_classification", "train", '{"txt": "c", "label": "x"}', "", "'txt'"),
    ("token_classification", "train", '{"tokens": ["a", "b"], "tags": ["O"]}', "", "1 tags for 2 tokens"),
    (
        "token_classification",
        "validation",
        '{"tokens": ["a"], "tags": ["B-LOC"]}',
        "",
        "field 'tags': unknown label 'B-LOC'",
    ),
    (
        "token_classification",
        "train",
        '{"tokens": ["a"], "tags": ["I-PER"]}',
        "  label_names: [O, B-PER]\n",
        "unknown label 'I-PER'",
    ),
    ("token_classification", "train", '{"tokens": [], "tags": []}', "", "'tokens'"),
    ("reward_model", "train", '{"prompt": "p", "chosen": "a", "rejected": "a"}', "", "'rejected'"),
    ("reward_model", "train", '{"prompt": [], "chosen": "a", "rejected": "b"}', "", "'prompt'"),
    ("reward_model", "validation", '{"prompt": "p", "chosen": "a"}', "", "'rejected'"),
    ("reward_model", "train", '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": Infinity}', "", "Infinity"),
    ("preference", "train", '{"prompt": "p", "chosen": "a"}', "", "'rejected'"),
    ("preference", "validation", '{"prompt": "p", "rejected": "a"}', "", "'chosen'"),
    (
        "preference",
        "train",
        '{"prompt": "p", "chosen": "", "rejected": "b"}',
        "",
        "field 'chosen': an empty completion",
    ),
    (
        "preference",
        "test",
        '{"prompt": "p", "chosen": "a", "rejected": " "}',
        "",
        "field 'rejected': an empty completion",
    ),
    ("preference", "train", '{"prompt": "p", "completion": "a", "desirable": true}', "", "'completion'"),
    ("embedding", "train", '{"messages": [{"role": "bot", "content": "x"}]}', "", "'messages.0.role'"),
    ("embedding", "test", '{"messages": "hi"}', "", "'messages'"),
]


def _task_config(tmp_path: Path, task: str, split: str, bad: str | None, extra: str, on_error: str = "raise") -> Path:
    _, good = TASK_DATA[task]
    files = {}
    for name in ("train", "validation", "test"):
        lines = list(good)
        if name == split and bad is not None:
            lines.insert(1, bad)
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    model = "builtin:minilm-l6" if task == "embedding" else "builtin:tiny-llama"
    path = tmp_path / "cfg.yaml"
    config = train_config(
        tmp_path / "out",
        task=task,
        model=model,
        loss=None,  # the task's default loss
        data={
            **{k: str(v) for k, v in files.items()},
            "on_error": on_error,
            "max_length": 64,
            "max_train_samples": None,
        },
        training={"max_steps": 1, "batch_size": 2, "lr": None},
    )
    path.write_text(yaml.safe_dump(config).replace("data:\n", "data:\n" + extra), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("task", "split", "bad", "extra", "expected"), DATA_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DATA_CASES)]
)
def test_bad_data_exits_2_before_the_model_loads(
    tmp_path: Path, capsys, no_model, task: str, split: str, bad: str, extra: str, expected: str
) -> None:
    path = _task_config(tmp_path, task, split, bad, extra)
    code, err = run_cli(["train", str(path)], capsys)
    assert code == 2, err
    assert f"{tmp_path / split}.jsonl:2: " in err and expected in err, err


@pytest.mark.parametrize("task", sorted(TASK_DATA))
def test_good_data_reaches_the_model(tmp_path: Path, capsys, no_model, task: str) -> None:
    """The control of the test above: with good data the run gets as far as loading the model."""
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(["train", str(_task_config(tmp_path, task, "train", None, ""))])


def test_skipped_records_are_counted_and_listed_in_summary_json(tmp_path: Path, capsys) -> None:
    bad = [
        ('{"text": "c", "label": NaN}', "invalid JSON (NaN"),
        ('{"text": 1, "label": "x"}', "field 'text'"),
        ('{"text": "c\\ud800", "label": "x"}', "field 'text': not valid Unicode"),
        ("{oops", "invalid JSON"),
    ]
    path = _task_config(tmp_path, "sequence_classification", "train", None, "", on_error="skip")
    train = tmp_path / "train.jsonl"
    good = train.read_text(encoding="utf-8").splitlines()
    train.write_text("\n".join([good[0], *(b for b, _ in bad), good[1]]) + "\n", encoding="utf-8")
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    summary_path = tmp_path / "out" / "summary.json"
    assert f"run summary: {summary_path} (bad records skipped: train 4; listed there)" in out
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    listed = summary["skipped"]["train"]
    assert listed["count"] == 4 and summary["skipped"]["validation"]["count"] == 0
    for i, (entry, (_, why)) in enumerate(zip(listed["records"], bad), 2):
        assert entry.startswith(f"{train}:{i}: {why}"), entry
    assert summary["steps"] == 1 and summary["task"] == "sequence_classification"


def test_causal_lm_reports_skipped_and_dropped_before_its_model(tmp_path: Path, capsys, no_model) -> None:
    long = json.dumps({"messages": [{"role": "user", "content": "w " * 300}, {"role": "assistant", "content": "ok"}]})
    path = _task_config(tmp_path, "causal_lm", "train", '{"messages": 1}', "", on_error="skip")
    train = tmp_path / "train.jsonl"
    train.write_text(train.read_text(encoding="utf-8") + long + "\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(["train", str(path)])
    out = capsys.readouterr().out
    train_line = next(line for line in out.splitlines() if line.startswith("train:"))
    assert "skipped records: 1" in train_line and "1 with no trained token left after truncation" in train_line


def test_preference_unpaired_records_name_a_missing_desirable(tmp_path: Path, capsys, no_model) -> None:
    path = _task_config(tmp_path, "preference", "train", None, "")
    good = json.dumps({"prompt": "Say hi", "completion": "hi", "desirable": True})
    (tmp_path / "train.jsonl").write_text(f"{good}\n" + '{"prompt": "p", "completion": "a"}\n', encoding="utf-8")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config["loss"] = {"terms": [{"name": "kto"}]}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    code, err = run_cli(["train", str(path)], capsys)
    assert code == 2 and f"{tmp_path / 'train'}.jsonl:2: " in err and "'desirable'" in err, err


def test_preference_a_template_error_names_the_record_and_field(tmp_path: Path, capsys, no_model) -> None:
    """A chat template that refuses a record (here a system prompt) is that record's error."""
    template = Path(__file__).parents[1] / "masking" / "templates" / "gemma.jinja"
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    bad = json.dumps({"prompt": system, "chosen": "hi", "rejected": "go away"})
    path = _task_config(tmp_path, "preference", "validation", bad, f"  template: {template}\n")
    code, err = run_cli(["train", str(path)], capsys)
    assert code == 2 and f"{tmp_path / 'validation'}.jsonl:2: field 'prompt'" in err and "System role" in err, err


def test_preference_skips_and_lists_identical_pairs_and_lists_cut_prompts(tmp_path: Path, capsys) -> None:
    """chosen == rejected is counted and skipped whatever data.on_error says; a prompt longer than
    max_length loses its start (the completions are kept) and is listed with file:line."""
    path = _task_config(tmp_path, "preference", "train", None, "")
    train = tmp_path / "train.jsonl"
    same = json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"})
    long = json.dumps({"prompt": "w " * 300, "chosen": "yes", "rejected": "no"})
    good = train.read_text(encoding="utf-8").splitlines()
    train.write_text("\n".join([good[0], same, long, good[1]]) + "\n", encoding="utf-8")
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(bad records skipped: train 1; listed there)" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    (entry,) = summary["skipped"]["train"]["records"]
    assert entry.startswith(f"{train}:2: field 'rejected': the same text as 'chosen'"), entry
    assert any(t.startswith(f"{train}:3: prompt cut from") for t in summary["truncated"]["records"]), summary


# ---- fuzzing configs ----------------------------------------------------------------------------

CONFIG_PATHS = [
    "seed",
    "task",
    "model",
    "dtype",
    "training.lr",
    "training.batch_size",
    "training.warmup",
    "training.epochs",
    "training.max_steps",
    "training.scheduler",
    "training.grad_accum",
    "data.max_length",
    "data.on_error",
    "data.mask",
    "data.role_weights",
    "loss.terms",
    "loss.terms.0.weight",
    "loss.terms.0.name",
    "eval.splits",
    "embedding.recall_at",
    "training.nope",
    "nope",
]
ODD_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, 0.5, 1.5, 2**40, "", "\x00", "1e-3"]),
    st.fixed_dictionaries(
        {"schedule": st.sampled_from(["cosine", "step", "bogus"]), "start": JSON_SCALARS},
        optional={"end": JSON_SCALARS},
    ),
)


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_PATHS), ODD_VALUES, min_size=1, max_size=3))
def test_fuzz_train_config_is_valid_or_a_user_error(changes: dict[str, Any]) -> None:
    from losslab.compare.config import set_dotted

    data = {
        "task": "sequence_classification",
        "model": "builtin:tiny-llama",
        "output_dir": "out",
        "data": {"train": "t.jsonl"},
        "loss": {"terms": [{"name": "cross_entropy", "weight": 1.0}]},
    }
    try:
        set_dotted(data, changes)
        config = validate(TrainConfig, data, source="cfg.yaml")
        build_composite(config.loss.terms, total_steps=10, where="cfg.yaml: loss.terms")
    except UserError as exc:
        assert "cfg.yaml" in str(exc) or "override" in str(exc), exc
        return
    t = config.training
    assert t.lr > 0 and math.isfinite(t.lr) and t.batch_size >= 1 and math.isfinite(t.epochs)
    assert t.warmup < 1 or t.warmup == int(t.warmup)
    assert 0 <= config.seed < 2**32 and config.data.max_length <= 1 << 24


# ---- the real command, as a user runs it ---------------------------------------------------------


@pytest.mark.parametrize("case", ["bad-record", "bad-config"])
def test_losslab_train_subprocess_exits_2_without_traceback(tmp_path: Path, case: str) -> None:
    if case == "bad-record":
        path = _task_config(tmp_path, "token_classification", "train", '{"tokens": ["a", "b"], "tags": ["O"]}', "")
        expected = f"{tmp_path / 'train.jsonl'}:2: field 'tags': 1 tags for 2 tokens"
    else:
        path = config_file(tmp_path, "training:\n  warmup: 1.5\n")
        expected = f"{path}:7: field 'training.warmup'"
    done = subprocess.run(
        [sys.executable, "-m", "losslab.cli", "train", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and expected in done.stderr, done.stderr
    assert not (tmp_path / "out" / "model").exists()
