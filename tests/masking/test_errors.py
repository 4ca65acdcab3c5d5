"""Bad input: a clear error naming file and line, or a counted skip with on_error: skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from losslab.cli import main
from losslab.errors import UserError
from losslab.masking.build import BuildStats, MaskBuilder, MaskConfig, build_samples
from losslab.masking.spans import IGNORE_INDEX

from .conftest import FAMILIES, family_tokenizer, template_of, write_jsonl

GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
BAD = [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}', "messages.0.role"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "messages.0.role"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "messages.0.content"),
    ('{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "x"}]}', "messages.0.content"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}', "no assistant turn"),
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": -1}]}',
        "messages.1.weight",
    ),
]


@pytest.mark.parametrize(("bad", "expected"), BAD, ids=[e for _, e in BAD])
def test_bad_record_is_an_error_naming_file_and_line(tmp_path: Path, tokenizer, bad: str, expected: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", GOOD, bad, GOOD)
    with pytest.raises(UserError) as info:
        build_samples(path, tokenizer)
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and expected in message
    assert "on_error: skip" in message


def test_skip_counts_every_bad_record_and_keeps_the_good(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", GOOD, *(b for b, _ in BAD), GOOD)
    stats = BuildStats()
    samples = build_samples(path, tokenizer, MaskConfig(on_error="skip"), stats=stats)
    assert [s["source"]["line"] for s in samples] == [1, len(BAD) + 2]
    assert stats.skipped.count == len(BAD) and stats.records == 2
    assert all(e.startswith(f"{path}:") for e in stats.skipped.examples)
    assert f"skipped records: {len(BAD)}" in stats.summary()


def test_policy_all_accepts_a_conversation_without_assistant(tokenizer) -> None:
    record = {"messages": [{"role": "user", "content": "just text"}]}
    (sample,) = build_samples([record], tokenizer, MaskConfig(mask="all"))
    assert sample["labels"] == [IGNORE_INDEX, *sample["input_ids"][1:]]


def test_template_exception_names_the_line(tmp_path: Path, tokenizer) -> None:
    gemma = next(f for f in FAMILIES if f.name == "gemma")
    twice_user = (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
        '{"role": "assistant", "content": "c"}]}'
    )
    path = write_jsonl(tmp_path / "data.jsonl", GOOD, twice_user)
    builder = MaskBuilder(family_tokenizer(tokenizer, gemma), MaskConfig(template=template_of(gemma)))
    with pytest.raises(UserError, match=r"data.jsonl:2: the chat template failed.*roles must alternate"):
        list(builder.iter_sequences(path))
    builder = MaskBuilder(family_tokenizer(tokenizer, gemma), MaskConfig(template=template_of(gemma), on_error="skip"))
    stats = BuildStats()
    assert len(list(builder.iter_sequences(path, stats))) == 1 and stats.skipped.count == 1


def test_in_memory_records_and_kinds(tokenizer) -> None:
    with pytest.raises(UserError, match=r"<records>:2: .*'output'"):
        build_samples([{"instruction": "a", "output": "b"}, {"instruction": "a"}], tokenizer)
    with pytest.raises(UserError, match="cannot tell the record kind"):
        build_samples([{"text": "x"}], tokenizer)
    with pytest.raises(UserError, match="unknown mask policy"):
        MaskConfig(mask="everything")
    with pytest.raises(UserError, match="unknown strategy"):
        MaskConfig(strategy="both")


@pytest.mark.usefixtures("cached_tokenizer")
def test_cli_reports_the_line_and_exits_2(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", GOOD, BAD[0][0])
    assert main(["inspect", str(path)]) == 2
    assert f"losslab: error: {path}:2: invalid JSON" in capsys.readouterr().err
    assert main(["inspect", str(path), "--on-error", "skip", "--format", "jsonl"]) == 0
    assert "skipped records: 1" in capsys.readouterr().err


def test_missing_template_file(tokenizer) -> None:
    with pytest.raises(UserError, match="chat template file not found"):
        build_samples(
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
            tokenizer,
            MaskConfig(template="no/such/template.jinja"),
        )
