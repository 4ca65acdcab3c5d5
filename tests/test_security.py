"""Security: no unpickling of files a user did not produce, no remote code unless asked, safe
YAML, escaped HTML, and writes confined to output_dir. Everything offline."""

from __future__ import annotations

import ast
import inspect
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml

from losslab.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src" / "losslab"
EVIL = "<script>alert('x')</script>"
EVIL_IMG = "<img src=x onerror=alert(1)>"
MARKER_CODE = "import pathlib\npathlib.Path(__file__).with_name('EXECUTED').write_text('remote code ran')\n"


class _Page(HTMLParser):
    """Counts the elements an injection would create, and collects the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts = 0
        self.handlers: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.scripts += tag == "script"
        self.handlers += [name for name, _ in attrs if name.startswith("on")]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Page:
    parsed = _Page()
    parsed.feed(page)
    return parsed


# ---- (a) pickle ---------------------------------------------------------------------------------


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    return [(ast.unparse(node.func), node) for node in ast.walk(tree) if isinstance(node, ast.Call)]


def test_losslab_never_unpickles() -> None:
    """No pickle/joblib/dill/marshal import, no np.load(allow_pickle=True), and any torch.load
    with weights_only=True (there is none today)."""
    problems = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in {"pickle", "cPickle", "joblib", "dill", "marshal", "shelve"} for n in names):
                    problems.append(f"{path}:{node.lineno}: imports {names}")
        for name, call in _calls(tree):
            kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name.endswith("torch.load") and kwargs.get("weights_only") != "True":
                problems.append(f"{path}:{call.lineno}: torch.load without weights_only=True")
            if name.endswith(("np.load", "numpy.load")) and kwargs.get("allow_pickle") not in (None, "False"):
                problems.append(f"{path}:{call.lineno}: np.load with allow_pickle")
    assert problems == []


def test_trainer_resume_loads_only_with_weights_only() -> None:
    """What a resume reads from a checkpoint (rng_state.pth, optimizer.pt, scheduler.pt,
    scaler.pt, weights) goes through torch.load(weights_only=True) or safetensors; the
    pickled training_args.bin is written, never read."""
    from transformers import trainer

    tree = ast.parse(inspect.getsource(trainer))
    loads = [call for name, call in _calls(tree) if name == "torch.load"]
    assert len(loads) >= 6
    assert all({k.arg: ast.unparse(k.value) for k in call.keywords}.get("weights_only") == "True" for call in loads)
    source = inspect.getsource(trainer)
    assert "TRAINING_ARGS_NAME" in source
    assert all("torch.save" in line for line in source.splitlines() if "TRAINING_ARGS_NAME)" in line)


def test_model_without_safetensors_weights_is_refused_without_unpickling(tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from losslab.models import load_causal_lm, load_model

    LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    ).save_pretrained(tmp_path)
    torch.save({"model.embed_tokens.weight": torch.zeros(32, 8)}, tmp_path / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for load in (
        lambda: load_causal_lm(str(tmp_path)),
        lambda: load_model(AutoModelForSequenceClassification, str(tmp_path), num_labels=2),
    ):
        with pytest.raises(UserError, match="no safetensors weights"):
            load()


# ---- (b) remote code ----------------------------------------------------------------------------


@pytest.fixture
def custom_code_model(tmp_path: Path) -> Path:
    """A model folder whose config points at Python files that leave a marker when imported."""
    auto_map = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
        "AutoModelForSequenceClassification": "modeling_evil.EvilModel",
    }
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "EvilTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
            }
        )
    )
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (tmp_path / name).write_text(MARKER_CODE)
    return tmp_path


def test_custom_model_code_is_refused_without_trust_remote_code(custom_code_model: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from losslab.models import load_causal_lm, load_model, load_tokenizer

    name = str(custom_code_model)
    for load in (
        lambda: load_tokenizer(name),
        lambda: load_causal_lm(name),
        lambda: load_model(AutoModelForSequenceClassification, name, num_labels=2),
    ):
        with pytest.raises(UserError, match="trust_remote_code: true"):
            load()
    assert not (custom_code_model / "EXECUTED").exists()


def test_train_cli_refuses_custom_code_with_exit_2(custom_code_model: Path, tmp_path: Path, capsys) -> None:
    from losslab.cli import main

    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "task": "causal_lm",
                "model": str(custom_code_model),
                "output_dir": str(tmp_path / "out"),
                "data": {"train": "builtin:chatterbot"},
            }
        )
    )
    assert main(["train", str(config)]) == 2
    assert "trust_remote_code" in capsys.readouterr().err
    assert not (custom_code_model / "EXECUTED").exists()


def test_trust_remote_code_is_off_by_default() -> None:
    from losslab.train.config import TrainConfig

    assert TrainConfig.model_validate({"output_dir": "x", "data": {"train": "t.jsonl"}}).trust_remote_code is False


# ---- (c) YAML -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "compare"])
def test_yaml_python_tags_are_refused_with_file_and_line(tmp_path: Path, command: str) -> None:
    from losslab.compare.config import load_study
    from losslab.config import load_config
    from losslab.train.config import TrainConfig

    marker = tmp_path / "PWNED"
    path = tmp_path / "config.yaml"
    path.write_text(
        f"output_dir: out\ndata:\n  train: x.jsonl\nseed: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    with pytest.raises(
        UserError, match=r"config\.yaml:4: invalid YAML: could not determine a constructor.*python/object"
    ):
        load_study(path) if command == "compare" else load_config(TrainConfig, path)
    assert not marker.exists()


# ---- (d) HTML -----------------------------------------------------------------------------------


def test_inspect_html_escapes_dataset_text(tmp_path: Path, smollm2_tokenizer) -> None:
    from losslab.masking import BuildStats, MaskBuilder
    from losslab.masking.inspect import format_html

    record = {
        "messages": [
            {"role": "user", "content": f"{EVIL} and {EVIL_IMG}"},
            {"role": "assistant", "content": f"reply {EVIL}</pre></body>"},
        ]
    }
    stats = BuildStats()
    seqs = list(MaskBuilder(smollm2_tokenizer).iter_sequences([record], stats))
    page = format_html(seqs, stats, title=f"inspect {EVIL}")
    parsed = parse(page)
    assert parsed.scripts == 0 and parsed.handlers == []
    assert EVIL not in page and EVIL_IMG not in page
    text = "".join(parsed.text)
    assert text.count(EVIL) == 3 and EVIL_IMG in text  # shown as text: title, user, assistant


def test_compare_report_escapes_variant_metric_and_title_text(tmp_path: Path) -> None:
    from losslab.compare.report import markdown_summary, render_report

    metric_name = f"test/{EVIL_IMG}"
    summary = {"per_seed": {"0": 0.5, "1": 0.6}, "n": 2, "mean": 0.55, "std": 0.07, "ci_low": 0.5, "ci_high": 0.6}
    paired = {
        "n": 2,
        "mean_diff": 0.02,
        "diffs": [0.01, 0.03],
        "p_value": 0.5,
        "method": "exact sign-flip permutation",
        "better": True,
        "significant": False,
        "mark": "",
    }
    results = {
        "study": {
            "baseline": EVIL,
            "seeds": [0, 1],
            "confidence": 0.95,
            "alpha": 0.05,
            "n_bootstrap": 10,
            "metrics": [{"name": metric_name, "direction": "max"}],
        },
        "variants": {
            EVIL: {"metrics": {metric_name: summary}, "vs_baseline": {}, "overrides": {"data.mask": EVIL}},
            "other": {
                "metrics": {metric_name: summary},
                "vs_baseline": {metric_name: paired},
                "overrides": {},
                "tuned": {"loss.terms.1.weight": EVIL},
            },
        },
        "tuning": {},
    }
    page = render_report(results, [], title=EVIL)
    parsed = parse(page)
    assert parsed.scripts == 0 and parsed.handlers == []
    assert EVIL not in page and EVIL_IMG not in page
    text = "".join(parsed.text)
    assert EVIL in text and EVIL_IMG in text
    assert EVIL in markdown_summary(results)  # the terminal summary is plain text, not HTML


# ---- (e) paths ----------------------------------------------------------------------------------


def _study(tmp_path: Path, **extra) -> Path:
    data = {
        "output_dir": str(tmp_path / "study"),
        "base": {
            "task": "causal_lm",
            "model": "builtin:tiny-llama",
            "data": {"train": "builtin:chatterbot"},
            "training": {"max_steps": 1},
        },
        "variants": [{"name": "ce"}],
        "metrics": [{"name": "validation/loss", "direction": "min"}],
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", "..", ".", "x\\..\\y", ""])
def test_variant_names_cannot_leave_output_dir(tmp_path: Path, name: str) -> None:
    from losslab.compare.config import load_study

    path = _study(tmp_path, variants=[{"name": "ce"}, {"name": name}])
    with pytest.raises(UserError, match=r"study\.yaml:\d+: field 'variants\.1\.name'"):
        load_study(path)


def test_run_folders_stay_under_output_dir(tmp_path: Path) -> None:
    from losslab.compare.config import load_study
    from losslab.compare.runs import plan as plan_runs

    study = load_study(_study(tmp_path, variants=[{"name": "ce"}, {"name": "a..b"}, {"name": "x.+-_"}]))
    root = (tmp_path / "study").resolve()
    runs = plan_runs(study)
    assert len(runs) == 9
    assert all(run.dir.resolve().parent == root / "runs" for run in runs)
    assert all(Path(run.config["output_dir"]).resolve().is_relative_to(root) for run in runs)


@pytest.mark.parametrize("storage", ["sqlite:////tmp/elsewhere.db", "sqlite:///../outside.db"])
def test_sqlite_tuning_storage_outside_output_dir_is_refused(tmp_path: Path, storage: str, monkeypatch) -> None:
    from losslab.compare.config import load_study

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"study\.yaml:\d+: field 'tuning\.storage'.*outside output_dir"):
        load_study(_study(tmp_path, tuning={"storage": storage}))
    inside = f"sqlite:///{tmp_path / 'study' / 'my.db'}"
    assert load_study(_study(tmp_path, tuning={"storage": inside})).config.tuning.storage == inside
