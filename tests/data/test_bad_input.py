"""Bad records, swept: every record loader error names file, line and field, or is a counted skip;
odd but valid text is kept; fuzzed bytes and fields. The contract: tests/bad_input.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from losslab.config import load_yaml
from losslab.data.records import SKIP_HINT, SkipLog, load_records
from losslab.data.schemas import SCHEMAS
from losslab.errors import UserError

from ..bad_input import CHAT, FUZZ, GOOD, JSON_VALUES, re_escape

# ---- one valid record per schema, and the bad variants of each ----------------------------------

SURROGATE = '"a\\ud800b"'  # a lone surrogate, as JSON writes it


def _with(schema: str, **fields: Any) -> str:
    return json.dumps({**GOOD[schema], **fields})


def _without(schema: str, field: str) -> str:
    return json.dumps({k: v for k, v in GOOD[schema].items() if k != field})


def _raw_field(schema: str, field: str, raw: str) -> str:
    """The good record with ``field`` set to the raw JSON text ``raw``."""
    return json.dumps({**GOOD[schema], field: "@@"}).replace('"@@"', raw)


# (schema, bad JSON line, what the message must contain: the field, or the problem)
RECORD_CASES: list[tuple[str, str, str]] = [
    # syntax: every schema
    *[(s, json.dumps(GOOD[s])[:-3], "invalid JSON") for s in GOOD],  # truncated record
    *[(s, "{" + json.dumps(GOOD[s])[1:].replace(":", "=", 1), "invalid JSON") for s in GOOD],
    *[(s, "[1, 2]", "expected a JSON object") for s in GOOD],
    *[(s, '"text"', "expected a JSON object") for s in GOOD],
    *[(s, "null", "expected a JSON object") for s in GOOD],
    *[(s, _with(s, unknown_field=1), "'unknown_field'") for s in GOOD],
    ("chat", "[" * 50_000 + "]" * 50_000, "nested too deeply"),
    # missing fields
    ("chat", "{}", "'messages'"),
    ("chat", json.dumps({"messages": [{"content": "x"}]}), "'messages.0.role'"),
    ("chat", json.dumps({"messages": [{"role": "user"}]}), "'messages.0.content'"),
    ("instruction", _without("instruction", "output"), "'output'"),
    ("instruction", _without("instruction", "instruction"), "'instruction'"),
    ("classification", _without("classification", "label"), "'label'"),
    ("classification", _without("classification", "text"), "'text'"),
    ("regression", _without("regression", "label"), "'label'"),
    ("ner", _without("ner", "tags"), "'tags'"),
    ("preference", _without("preference", "rejected"), "'rejected'"),
    ("preference", _without("preference", "prompt"), "'prompt'"),
    # wrong types
    ("chat", json.dumps({"messages": "hi"}), "'messages'"),
    ("chat", json.dumps({"messages": [{"role": "user", "content": 3}]}), "'messages.0.content'"),
    ("chat", json.dumps({"messages": [{"role": "user", "content": ["a"]}]}), "'messages.0.content'"),
    ("chat", json.dumps({"messages": [{"role": "user", "content": None}]}), "'messages.0.content'"),
    ("chat", json.dumps({"messages": [{"role": "user", "content": "a", "weight": "2"}]}), "'messages.0.weight'"),
    ("chat", json.dumps({"messages": [{"role": "user", "content": "a", "weight": -1}]}), "'messages.0.weight'"),
    ("chat", json.dumps({"messages": ["hi"]}), "'messages.0'"),
    ("instruction", _with("instruction", output=42), "'output'"),
    ("instruction", _with("instruction", input=None), "'input'"),
    ("classification", _with("classification", text=7), "'text'"),
    ("classification", _with("classification", label=True), "'label'"),
    ("classification", _with("classification", label=1.5), "'label'"),
    ("classification", _with("classification", label=["a"]), "'label'"),
    ("regression", _with("regression", label="1.5"), "'label'"),
    ("regression", _with("regression", label=True), "'label'"),
    ("ner", _with("ner", tokens="Ann runs"), "'tokens'"),
    ("ner", _with("ner", tags=["B-PER", 0]), "'tags.1'"),
    ("preference", _with("preference", chosen=1), "'chosen'"),
    ("preference", _with("preference", margin="big"), "'margin'"),
    ("preference", _with("preference", prompt={"role": "user"}), "'prompt'"),
    # unknown roles
    ("chat", json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "'messages.0.role'"),
    ("chat", json.dumps({"messages": [{"role": "User", "content": "x"}]}), "'messages.0.role'"),
    ("chat", json.dumps({"messages": [{"role": "", "content": "x"}]}), "'messages.0.role'"),
    ("preference", _with("preference", prompt=[{"role": "narrator", "content": "x"}]), "'prompt"),
    # empty collections
    ("chat", json.dumps({"messages": []}), "'messages'"),
    ("ner", _with("ner", tokens=[], tags=[]), "'tokens'"),
    ("preference", _with("preference", prompt=[]), "'prompt'"),
    # non-finite numbers: not JSON, and they would train on NaN
    ("regression", _raw_field("regression", "label", "NaN"), "NaN"),
    ("regression", _raw_field("regression", "label", "Infinity"), "Infinity"),
    ("regression", _raw_field("regression", "label", "-1e999"), "too large"),
    ("preference", _raw_field("preference", "margin", "NaN"), "NaN"),
    ("preference", _raw_field("preference", "margin", "9" * 400), "'margin': number 999"),
    (
        "chat",
        json.dumps(CHAT).replace('"hello"}', '"hello", "weight": ' + "9" * 400 + "}"),
        "'messages.1.weight': number 999",
    ),
    ("chat", json.dumps(CHAT).replace('"hello"}', '"hello", "weight": 1e400}'), "too large"),
    # lone surrogates (JSON escapes that are not text)
    *[
        (s, _raw_field(s, f, SURROGATE), f"'{f}'")
        for s, f in [
            ("instruction", "output"),
            ("classification", "text"),
            ("classification", "label"),
            ("regression", "text"),
            ("preference", "chosen"),
            ("preference", "prompt"),
        ]
    ],
    ("chat", json.dumps(CHAT).replace('"hello"', SURROGATE), "'messages.1.content'"),
    ("ner", json.dumps(GOOD["ner"]).replace('"runs"', SURROGATE), "'tokens.1'"),
    # wrong label sets inside a record, identical preference answers
    ("ner", _with("ner", tags=["O"]), "1 tags for 2 tokens"),
    ("ner", _with("ner", tags=["O", "O", "O"]), "3 tags for 2 tokens"),
    ("preference", _with("preference", chosen="same", rejected="same"), "'rejected'"),
    # unknown keys are named as written, however they look (pandas' index column, non-ASCII, a type's name)
    ("instruction", json.dumps({**GOOD["instruction"], "Unnamed: 0": 3}), "field 'Unnamed: 0': Extra inputs"),
    ("instruction", json.dumps({**GOOD["instruction"], "größe": 3}), "field 'größe': Extra inputs"),
    ("classification", json.dumps({**GOOD["classification"], "str": 3}), "field 'str': Extra inputs"),
    (
        "chat",
        json.dumps({"messages": [{"role": "user", "content": "x", "tool-call": {}}]}),
        "field 'messages.0.tool-call': Extra inputs",
    ),
]
RECORD_IDS = [f"{s}-{i}" for i, (s, _, _) in enumerate(RECORD_CASES)]


def _file(tmp_path: Path, schema: str, bad: str | bytes) -> Path:
    good = json.dumps(GOOD[schema]).encode()
    path = tmp_path / "data.jsonl"
    path.write_bytes(good + b"\n" + (bad if isinstance(bad, bytes) else bad.encode()) + b"\n" + good + b"\n")
    return path


@pytest.mark.parametrize(("schema", "bad", "expected"), RECORD_CASES, ids=RECORD_IDS)
def test_bad_record_names_file_line_field_or_is_counted(tmp_path: Path, schema: str, bad: str, expected: str) -> None:
    path = _file(tmp_path, schema, bad)
    with pytest.raises(UserError) as info:
        list(load_records(path, SCHEMAS[schema]))
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and expected in message, message
    assert "on_error: skip" in message
    skipped = SkipLog()
    kept = list(load_records(path, SCHEMAS[schema], on_error="skip", skipped=skipped))
    assert [s.line for s, _ in kept] == [1, 3]
    assert skipped.count == 1 and skipped.examples == [message.split(" (to skip such records")[0]]


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8 (byte 47)"),
        (b"\xff\xfe{\x00}\x00", "not UTF-8 (byte 1)"),
    ],
)
def test_invalid_utf8_line(tmp_path: Path, bad: bytes, expected: str) -> None:
    path = _file(tmp_path, "chat", bad)
    with pytest.raises(UserError, match=rf"data.jsonl:2: {re_escape(expected)}"):
        list(load_records(path, SCHEMAS["chat"]))


# valid but odd: kept exactly as written
ODD_TEXTS = [
    "",
    " ",
    "a\x00b",
    "\x1b[31mred\x1b[0m",
    "tab\there",
    "\r",
    "\u2028",
    "\ue000\ue003",
    "\U0010fffd",
    "x" * 100_000,
]


@pytest.mark.parametrize("text", ODD_TEXTS, ids=[repr(t[:12]) for t in ODD_TEXTS])
def test_odd_but_valid_text_is_kept(tmp_path: Path, text: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": text, "label": "pos"}) + "\n", encoding="utf-8")
    ((_, record),) = load_records(path, SCHEMAS["classification"])
    assert record.text == text


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_invalid_utf8_after_a_byte_order_mark_is_placed_in_the_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"bom{suffix}"
    raw = b"\xef\xbb\xbf" + (b'{"text": "caf\xe9", "label": "x"}' if suffix == ".jsonl" else b'[\n{"text": "caf\xe9"}]')
    path.write_bytes(raw)
    line, byte = (1, raw.index(b"\xe9") + 1) if suffix == ".jsonl" else (2, raw.index(b"\xe9") + 1)
    with pytest.raises(UserError, match=rf"bom{suffix}:{line}: not UTF-8 \(byte {byte}\)"):
        list(load_records(path, SCHEMAS["classification"]))
    config = tmp_path / "c.yaml"
    config.write_bytes(b"\xef\xbb\xbfa: 1\n\xff\n")
    with pytest.raises(UserError, match=r"c.yaml:2: not UTF-8 \(byte 9\)"):
        load_yaml(config)


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    for suffix, body in (
        (".jsonl", json.dumps(GOOD["classification"])),
        (".json", json.dumps([GOOD["classification"]])),
    ):
        path = tmp_path / f"bom{suffix}"
        path.write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert [r.text for _, r in load_records(path, SCHEMAS["classification"])] == ["nice"]


# whole files that cannot be read: an error naming the file (and line where there is one)
FILE_CASES: list[tuple[str, bytes, str]] = [
    (".json", b'[{"text": "a", "label": "x"},\n {"text": "b" "label": "y"}]', r"data.json:2: invalid JSON"),
    (".json", b'{"text": "a",\n "label": "x"', r"data.json:1: invalid JSON"),  # a JSON object file read as lines
    (".json", b'"just a string"', r"data.json: a .json data file must hold a list"),
    (".json", b'[{"text": "a", "label": NaN}]', r"data.json: invalid JSON \(NaN"),
    (".json", b'[\n{"text": "caf\xe9", "label": "x"}]', r"data.json:2: not UTF-8"),
    (".json", b"[" * 50_000, r"data.json: invalid JSON \(nested too deeply\)"),
    (".csv", b'text,label\n"unclosed,x\n', r"data.csv: cannot read this csv file"),
    (".csv", b"", r"data.csv: cannot read this csv file"),
    (".parquet", b"PAR1 not really parquet", r"data.parquet: cannot read this parquet file"),
    (".txt", b"hello", r"data.txt: unsupported data file type"),
    (".xml", b"<a/>", r"data.xml: unsupported data file type"),
]


@pytest.mark.parametrize(
    ("suffix", "body", "expected"), FILE_CASES, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(FILE_CASES)]
)
def test_unreadable_file_names_the_file(tmp_path: Path, suffix: str, body: bytes, expected: str) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_bytes(body)
    with pytest.raises(UserError, match=expected):
        list(load_records(path, SCHEMAS["classification"]))


def test_csv_records_are_numbered_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text,label\nnice,1.5\nbad,\nok,2\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"data.csv:2: field 'label'"):
        list(load_records(path, SCHEMAS["regression"]))


# ---- fuzzing the record loader ------------------------------------------------------------------

LINE_BYTES = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" "))


@FUZZ
@given(
    schema=st.sampled_from(sorted(GOOD)),
    lines=st.lists(st.one_of(LINE_BYTES, JSON_VALUES.map(lambda v: json.dumps(v).encode())), max_size=5),
)
@example(schema="chat", lines=[b"\xef\xbb\xbf"])  # a file that is only a byte-order mark: empty
@example(schema="chat", lines=[b"{}", b"\xef\xbb\xbf"])  # one after line 1 is content: invalid JSON
def test_fuzz_any_bytes_give_records_errors_or_counted_skips(tmp_path_factory, schema: str, lines: list[bytes]) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    # a UTF-8 byte-order mark opening the file is not content (it is accepted and dropped)
    text = [line.removeprefix(b"\xef\xbb\xbf") if i == 1 else line for i, line in enumerate(lines, 1)]
    counted = [i for i, line in enumerate(text, 1) if line.decode("utf-8", "replace").strip()]
    skipped = SkipLog()
    kept = list(load_records(path, SCHEMAS[schema], on_error="skip", skipped=skipped))
    skipped_lines = [int(e[len(str(path)) + 1 :].split(":")[0]) for e in skipped.examples]
    assert sorted([s.line for s, _ in kept] + skipped_lines) == counted
    if skipped.count:
        with pytest.raises(UserError) as info:
            list(load_records(path, SCHEMAS[schema]))
        assert str(info.value) == skipped.examples[0] + SKIP_HINT


def _mutations() -> st.SearchStrategy[tuple[str, str, Any]]:
    """(schema, field, a bad or odd value) for one top-level field of a good record."""
    values = st.one_of(
        JSON_VALUES,
        st.text(alphabet=st.characters(codec=None), max_size=8),
        st.sampled_from(["\x00", "\x1b", "\ud800", "\udfff", "", " "]),
        st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),
    )
    return st.tuples(st.sampled_from(sorted(GOOD)), st.data(), values).map(
        lambda t: (t[0], t[1].draw(st.sampled_from(sorted(GOOD[t[0]]))), t[2])
    )


@FUZZ
@given(_mutations())
def test_fuzz_mutated_field_is_accepted_or_named(tmp_path_factory, mutation: tuple[str, str, Any]) -> None:
    """One field of a good record replaced by anything: it validates, or the error names that field
    (or says the number or the text is not valid)."""
    schema, field, value = mutation
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    line = json.dumps({**GOOD[schema], field: value})  # NaN/inf written as JSON's non-standard NaN/Infinity
    path.write_text(json.dumps(GOOD[schema]) + "\n" + line + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        ((_, _), (_, record)) = load_records(path, SCHEMAS[schema])
    except UserError as exc:
        message = str(exc)
        assert message.startswith(f"{path}:2: "), message
        assert (
            f"'{field}" in message
            or "invalid JSON" in message
            or f"'{'tokens' if field == 'tags' else field}" in message
        ), message
    else:
        dumped = record.model_dump()
        assert all(not isinstance(v, float) or math.isfinite(v) for v in dumped.values())
        json.dumps(dumped).encode("utf-8")  # valid Unicode throughout
