"""`losslab inspect`: text view, HTML view (escaped, coloured by weight), jsonl contract, summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from losslab.cli import main
from losslab.masking.spans import IGNORE_INDEX

from .conftest import TEMPLATES, write_jsonl

pytestmark = pytest.mark.usefixtures("cached_tokenizer")

RECORD = {
    "messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Is <b>bold</b> & safe?"},
        {"role": "assistant", "content": "Yes: <script>alert(1)</script>"},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Quite.", "weight": 0.5},
    ]
}


def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", json.dumps(RECORD), json.dumps(RECORD))


def test_text_view_marks_trained_runs_and_weights(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(data(tmp_path)), "--color", "never", "--limit", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"── {tmp_path / 'chat.jsonl'}:1: ")
    assert "«Yes: <script>alert(1)</script><|im_end|>»\n" in out
    assert "«Quite.<|im_end|>»{0.5}" in out
    assert "«" not in out.split("«Yes")[0]  # nothing before the first reply is trained
    assert err.startswith("losslab inspect: samples: 1, tokens: ")
    assert "dropped samples: 0" in err and "strategy: auto -> concat for 1 conversation" in err


def test_text_view_in_colour(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(data(tmp_path)), "--color", "always", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[30;42mYes: <script>" in out and "\x1b[33m{0.5}\x1b[0m" in out
    assert "\x1b[2m<|im_start|>system" in out


def test_html_view_is_escaped_and_coloured_by_weight(tmp_path: Path, capsys) -> None:
    out = tmp_path / "view.html"
    assert main(["inspect", str(data(tmp_path)), "--format", "html", "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert "<script>" not in page and "<b>" not in page
    text = re.sub(r"</?span[^>]*>", "", page)  # one span per token
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;b&gt;bold&lt;/b&gt; &amp; safe" in text
    assert "rgba(40,167,69,1.00)" in page and "rgba(40,167,69,0.60)" in page  # weight 1 and 0.5
    assert "samples: 2, tokens: " in page and capsys.readouterr().out == ""


def test_jsonl_follows_the_contract(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(data(tmp_path)), "--format", "jsonl", "--strategy", "expand"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # two conversations x two assistant turns
    for i, line in enumerate(lines):
        obj = json.loads(line)
        assert set(obj) == {"source", "input_ids", "labels", "weights"}
        assert obj["source"] == {"file": str(tmp_path / "chat.jsonl"), "line": 1 + i // 2}
        assert len(obj["input_ids"]) == len(obj["labels"]) == len(obj["weights"])
        for tok, lab, w in zip(obj["input_ids"], obj["labels"], obj["weights"]):
            assert lab in (IGNORE_INDEX, tok)
            assert (w > 0) == (lab != IGNORE_INDEX)


def test_reasoning_template_summary_says_expand(tmp_path: Path, capsys) -> None:
    record = {
        "messages": [
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "<think>easy</think>2"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>also easy</think>4"},
        ]
    }
    path = write_jsonl(tmp_path / "r.jsonl", json.dumps(record))
    template = str(TEMPLATES / "qwen3_reasoning.jinja")
    assert main(["inspect", str(path), "--template", template, "--format", "jsonl"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2
    assert (
        "strategy: auto -> expand for 1 conversation; expand where the chat template renders a "
        "conversation prefix differently from the whole" in err
    )


def test_instruction_options(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "i.jsonl", json.dumps({"instruction": "Say hi", "output": "hi"}))
    assert main(["inspect", str(path), "--prompt-style", "alpaca", "--color", "never"]) == 0
    assert "### Response:\n«hi<|im_end|>»" in capsys.readouterr().out
    assert main(["inspect", str(path), "--no-mask-prompt", "--color", "never", "--role-weight", "user=0.5"]) == 0
    out = capsys.readouterr().out
    assert "«Say hi»{0.5}«<|im_end|>" in out and out.count("«") == 3  # weight 1, 0.5 (user), 1
    assert main(["inspect", str(path), "--role-weight", "user"]) == 2
    assert "--role-weight expects ROLE=WEIGHT" in capsys.readouterr().err
    assert main(["inspect", str(path), "--role-weight", "assistant=nan"]) == 2
    assert "the weight of 'assistant' must be a finite number >= 0; got nan" in capsys.readouterr().err


def test_a_bad_record_leaves_an_existing_out_file_untouched(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", json.dumps(RECORD), '{"messages": [{"role": "robot", "content": "x"}]}')
    out = tmp_path / "view.html"
    out.write_text("the previous view")
    assert main(["inspect", str(path), "--format", "html", "--out", str(out)]) == 2
    assert f"{path}:2" in capsys.readouterr().err
    assert (
        out.read_text() == "the previous view" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    )
    assert main(["inspect", str(data(tmp_path)), "--format", "html", "--out", str(out)]) == 0
    assert "samples: 2" in out.read_text(encoding="utf-8")
