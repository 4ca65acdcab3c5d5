"""Record files: errors name the file, the line and the field; skips are counted."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from losslab.data.records import SkipLog, load_records
from losslab.data.schemas import ChatRecord, NerRecord
from losslab.errors import UserError

GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages.0.role"),
        ('{"messages": [{"content": "hi"}]}', "messages.0.role"),
        ('{"messages": [{"role": "user", "content": 3}]}', "messages.0.content"),
        ('{"messages": []}', "'messages'"),
        ('{"messages": [{"role": "user", "content": "x"}], "extra": 1}', "'extra'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_record_names_file_line_field(tmp_path: Path, bad: str, expected: str) -> None:
    path = write(tmp_path, GOOD, "", bad, GOOD)
    with pytest.raises(UserError) as info:
        list(load_records(path, ChatRecord))
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert expected in message


def test_skip_counts_and_keeps_the_good(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD, "{oops", GOOD, '{"messages": 1}')
    skipped = SkipLog()
    rows = list(load_records(path, ChatRecord, on_error="skip", skipped=skipped))
    assert [s.line for s, _ in rows] == [1, 3]
    assert skipped.count == 2 and skipped.examples[0].startswith(f"{path}:2:")


def test_ner_lengths_must_match(tmp_path: Path) -> None:
    path = write(tmp_path, '{"tokens": ["a", "b"], "tags": ["O"]}')
    with pytest.raises(UserError, match="1 tags for 2 tokens"):
        list(load_records(path, NerRecord))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        list(load_records(tmp_path / "nope.jsonl", ChatRecord))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=6))
def test_arbitrary_lines_never_crash(tmp_path_factory, lines: list[str]) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.jsonl"
    path.write_bytes(("\n".join(line.replace("\n", " ") for line in lines) + "\n").encode("utf-8", "surrogatepass"))
    skipped = SkipLog()
    rows = list(load_records(path, ChatRecord, on_error="skip", skipped=skipped))
    assert len(rows) + skipped.count == sum(1 for line in lines if line.replace("\n", " ").strip())
