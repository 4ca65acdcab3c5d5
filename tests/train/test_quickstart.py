"""examples/quickstart.py: losslab's masks and loss in a user's own plain ``transformers.Trainer``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def test_the_quickstart_trains_with_a_plain_trainer(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--out", str(tmp_path / "qs"), "--steps", "4"])
    steps = result["steps"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["weight/consistency"] for r in steps] == pytest.approx([0.3, 0.225, 0.15, 0.075])  # the schedule moves
    for r in steps:  # the Trainer's loss is the weighted sum of the logged terms
        assert r["loss"] == pytest.approx(
            r["loss/token_cross_entropy"] + r["weight/consistency"] * r["loss/consistency"], rel=1e-4
        )
    assert steps[-1]["loss/token_cross_entropy"] < steps[0]["loss/token_cross_entropy"]
    tokenizer = module.load_tokenizer("builtin:tiny-llama")
    first = result["samples"][0]
    trained = tokenizer.decode([t for t, y in zip(first["input_ids"], first["labels"]) if y != -100])
    assert trained == "I'm well, thanks. And you?<|im_end|>Get some rest tonight, then.<|im_end|>"
    assert (tmp_path / "qs" / "log.jsonl").is_file() and "log:" in capsys.readouterr().out
