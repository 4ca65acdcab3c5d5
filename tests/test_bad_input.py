"""Bad input, swept: a test matrix and property-based fuzzing of every loader, collator and config.

Every bad input must end in one of two ways: a :class:`UserError` naming the file, the line
(or record index) and the field (``losslab train`` / ``compare``: exit status 2, one message,
no traceback, before a model is loaded), or, with ``on_error: skip``, a counted skip listed as
``file:line: reason``. Valid-but-odd input (control characters, empty strings, a byte-order
mark) must be accepted and kept as it is. Figures: docs/reliability.md, "Bad input".
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import losslab.models
from losslab.cli import main
from losslab.config import load_yaml, validate
from losslab.data.records import SKIP_HINT, SkipLog, load_records
from losslab.data.schemas import SCHEMAS
from losslab.errors import UserError
from losslab.losses.registry import build_composite
from losslab.masking import BuildStats, MaskConfig, PackedCollator, PaddedCollator, build_samples
from losslab.masking.spans import IGNORE_INDEX
from losslab.train.config import TrainConfig

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

# ---- one valid record per schema, and the bad variants of each ----------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
GOOD = {
    "chat": CHAT,
    "instruction": {"instruction": "Say hi", "input": "", "output": "hi"},
    "classification": {"text": "nice", "label": "pos"},
    "regression": {"text": "nice", "label": 1.5},
    "ner": {"tokens": ["Ann", "runs"], "tags": ["B-PER", "O"]},
    "preference": {"prompt": "Say hi", "chosen": "hi", "rejected": "go away", "margin": 1.0},
}
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
    ("chat", json.dumps(CHAT).replace('"hello"}', '"hello", "weight": ' + "9" * 400 + "}"), "'messages.1.weight': number 999"),
    ("chat", json.dumps(CHAT).replace('"hello"}', '"hello", "weight": 1e400}'), "too large"),
    # lone surrogates (JSON escapes that are not text)
    *[(s, _raw_field(s, f, SURROGATE), f"'{f}'") for s, f in
      [("instruction", "output"), ("classification", "text"), ("classification", "label"), ("regression", "text"),
       ("preference", "chosen"), ("preference", "prompt")]],
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
    ("chat", json.dumps({"messages": [{"role": "user", "content": "x", "tool-call": {}}]}),
     "field 'messages.0.tool-call': Extra inputs"),
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


@pytest.mark.parametrize(("bad", "expected"), [
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8 (byte 47)"),
    (b"\xff\xfe{\x00}\x00", "not UTF-8 (byte 1)"),
])
def test_invalid_utf8_line(tmp_path: Path, bad: bytes, expected: str) -> None:
    path = _file(tmp_path, "chat", bad)
    with pytest.raises(UserError, match=rf"data.jsonl:2: {re_escape(expected)}"):
        list(load_records(path, SCHEMAS["chat"]))


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


# valid but odd: kept exactly as written
ODD_TEXTS = ["", " ", "a\x00b", "\x1b[31mred\x1b[0m", "tab\there", "\r", "\u2028", "\ue000\ue003", "\U0010fffd", "x" * 100_000]


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
    for suffix, body in ((".jsonl", json.dumps(GOOD["classification"])), (".json", json.dumps([GOOD["classification"]]))):
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


@pytest.mark.parametrize(("suffix", "body", "expected"), FILE_CASES, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(FILE_CASES)])
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
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                           max_leaves=8)


@FUZZ
@given(schema=st.sampled_from(sorted(GOOD)), lines=st.lists(st.one_of(LINE_BYTES, JSON_VALUES.map(lambda v: json.dumps(v).encode())),
                                                         max_size=5))
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
    values = st.one_of(JSON_VALUES, st.text(alphabet=st.characters(codec=None), max_size=8),
                       st.sampled_from(["\x00", "\x1b", "\ud800", "\udfff", "", " "]),
                       st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]))
    return st.tuples(st.sampled_from(sorted(GOOD)), st.data(), values).map(
        lambda t: (t[0], t[1].draw(st.sampled_from(sorted(GOOD[t[0]]))), t[2]))


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
        assert f"'{field}" in message or "invalid JSON" in message or f"'{'tokens' if field == 'tags' else field}" in message, message
    else:
        dumped = record.model_dump()
        assert all(not isinstance(v, float) or math.isfinite(v) for v in dumped.values())
        json.dumps(dumped).encode("utf-8")  # valid Unicode throughout


# ---- masking: build_samples and the collators ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return losslab.models.load_tokenizer("builtin:tiny-llama")


def test_fully_truncated_answer_is_dropped_counted_and_listed(tiny_tokenizer) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "yes"}]}
    stats = BuildStats()
    samples = build_samples([CHAT, long, CHAT], tiny_tokenizer, MaskConfig(max_length=64), stats=stats)
    assert [s["source"]["line"] for s in samples] == [1, 3]
    assert stats.dropped == {"with no trained token left after truncation": 1}
    assert stats.dropped_log.examples == ["<records>:2: sample dropped (no trained token left after truncation)"]
    kept_end = build_samples([long], tiny_tokenizer, MaskConfig(max_length=64, truncation="start"))
    assert len(kept_end) == 1 and len(kept_end[0]["input_ids"]) == 64


@pytest.mark.parametrize(("line", "expected"), [
    ('{"text": "no kind"}', "data.jsonl:1: cannot tell the record kind"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "data.jsonl:1: the conversation has no assistant turn"),
    ('{"messages": [{"role": "user", "content": "\\udc00"}, {"role": "assistant", "content": "b"}]}',
     "data.jsonl:1: field 'messages.0.content': not valid Unicode"),
    ('{"instruction": "x", "output": 1}', "data.jsonl:1: field 'output'"),
])
def test_build_samples_errors_name_line_and_field(tmp_path: Path, tiny_tokenizer, line: str, expected: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=re_escape(expected)):
        build_samples(path, tiny_tokenizer)


def test_kind_is_read_from_the_first_record_that_shows_it(tmp_path: Path, tiny_tokenizer) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"mesages": []}\n' + json.dumps(CHAT) + "\n", encoding="utf-8")
    stats = BuildStats()
    samples = build_samples(path, tiny_tokenizer, MaskConfig(on_error="skip"), stats=stats)
    assert len(samples) == 1 and stats.skipped.count == 1 and "field 'mesages'" in stats.skipped.examples[0] \
        and stats.skipped.examples[0].startswith(f"{path}:1: ")


TEXT = st.text(alphabet=st.characters(codec="utf-8", categories=None), max_size=20) | st.sampled_from(
    ["", "\x00", "\x1b[0m", "\ue000", "<|im_end|>", "<|im_start|>assistant\n", "\n\n"])
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": TEXT},
                                optional={"weight": st.sampled_from([0, 0.5, 1, 2.0])})


@FUZZ
@given(records=st.lists(st.fixed_dictionaries({"messages": st.lists(MESSAGE, min_size=1, max_size=4)}), min_size=1, max_size=3),
       max_length=st.sampled_from([None, 8, 24, 64]), mask=st.sampled_from([None, "last", "all"]))
def test_fuzz_build_samples(tiny_tokenizer, records: list[dict], max_length: int | None, mask: str | None) -> None:
    """Any conversation: samples (labels are -100 or the token, within max_length), a dropped and
    listed sample, or a counted skip; never another exception."""
    stats = BuildStats()
    samples = build_samples(records, tiny_tokenizer, MaskConfig(on_error="skip", max_length=max_length, mask=mask), stats=stats)
    assert stats.records + stats.skipped.count == len(records)
    assert stats.dropped_samples == stats.dropped_log.count
    assert all(e.startswith("<records>:") for e in stats.skipped.examples + stats.dropped_log.examples)
    for s in samples:
        assert len(s["input_ids"]) == len(s["labels"]) == len(s["weights"])
        assert max_length is None or len(s["input_ids"]) <= max_length
        assert any(label != IGNORE_INDEX for label in s["labels"])
        assert all(label in (IGNORE_INDEX, tok) for label, tok in zip(s["labels"], s["input_ids"]))
    if samples:
        batch = PaddedCollator(tiny_tokenizer.pad_token_id)(samples)
        assert batch["labels"].shape == batch["input_ids"].shape == (len(samples), max(len(s["input_ids"]) for s in samples))


@pytest.mark.parametrize("collator", [PaddedCollator(0), PackedCollator(), PackedCollator(flash_attn_kwargs=True)],
                         ids=["padded", "packed", "packed-flash"])
@pytest.mark.parametrize(("sample", "expected"), [
    ({"input_ids": [1, 2], "labels": [1]}, "sample 1 of the batch: field 'labels': 1 entries for 2 input_ids"),
    ({"input_ids": [1, 2], "labels": [1, 2], "weights": [1.0]}, "field 'weights': 1 entries for 2 input_ids"),
    ({"input_ids": [1], "labels": [1, 1], "source": {"file": "d.jsonl", "line": 7}}, "d.jsonl:7: field 'labels'"),
])
def test_collators_refuse_misaligned_samples(collator, sample: dict, expected: str) -> None:
    good = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    with pytest.raises(UserError, match=re_escape(expected)):
        collator([good, sample])


def test_packed_collator_with_only_empty_samples() -> None:
    batch = PackedCollator(flash_attn_kwargs=True)([{"input_ids": [], "labels": []}])
    assert batch["input_ids"].shape == (1, 0) and batch["max_length_q"] == 0


SAMPLES = st.lists(st.integers(0, 6).flatmap(lambda n: st.fixed_dictionaries({
    "input_ids": st.lists(st.integers(1, 99), min_size=n, max_size=n),
    "labels": st.lists(st.sampled_from([IGNORE_INDEX, 1]), min_size=n, max_size=n),
    "weights": st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n, max_size=n)})), min_size=1, max_size=4)


@FUZZ
@given(samples=SAMPLES, side=st.sampled_from(["right", "left"]))
def test_fuzz_collators_against_a_plain_reference(samples: list[dict], side: str) -> None:
    padded = PaddedCollator(0, padding_side=side)(samples)
    width = max(len(s["input_ids"]) for s in samples)
    for b, s in enumerate(samples):
        pad = width - len(s["input_ids"])
        row = (lambda xs, v: list(xs) + [v] * pad) if side == "right" else (lambda xs, v: [v] * pad + list(xs))
        assert padded["input_ids"][b].tolist() == row(s["input_ids"], 0)
        assert padded["labels"][b].tolist() == row(s["labels"], IGNORE_INDEX)
        assert padded["weights"][b].tolist() == row(s["weights"], 0.0)
        assert padded["attention_mask"][b].tolist() == row([1] * len(s["input_ids"]), 0)
    packed = PackedCollator(flash_attn_kwargs=True)(samples)
    kept = [s for s in samples if s["input_ids"]]
    assert packed["input_ids"][0].tolist() == [t for s in kept for t in s["input_ids"]]
    assert packed["labels"][0].tolist() == [x for s in kept for x in [IGNORE_INDEX, *s["labels"][1:]]]
    assert packed["position_ids"][0].tolist() == [i for s in kept for i in range(len(s["input_ids"]))]
    assert packed["cu_seq_lens_q"].tolist() == [sum(len(s["input_ids"]) for s in kept[:i]) for i in range(len(kept) + 1)]


# ---- train configs: the matrix, in-process through the CLI --------------------------------------

BASE_CONFIG = """\
task: sequence_classification
model: builtin:tiny-llama
output_dir: {out}
data:
  train: {train}
"""
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
    ("loss:\n  terms: [{name: focal, weight: {schedule: linear, start: 0, end: 1, warmup_steps: -3}}]\n", "loss.terms.0", 7),
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


def _config(tmp_path: Path, change: str) -> Path:
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


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (any task) fails the test: bad input must be reported before that."""
    import importlib

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the bad input was reported")

    tokenizers: dict[str, Any] = {}
    real = losslab.models.load_tokenizer

    def cached(name: str, **kwargs: Any) -> Any:
        if name not in tokenizers:
            tokenizers[name] = real(name, **kwargs)
        return tokenizers[name]

    for task in ("causal_lm", "sequence_classification", "token_classification", "reward_model", "embedding"):
        module = importlib.import_module(f"losslab.train.tasks.{task}")
        for name in ("load_model", "load_causal_lm"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, boom)
        monkeypatch.setattr(module, "load_tokenizer", cached)


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(("change", "field", "line"), CONFIG_CASES, ids=[c[1] + f"-{i}" for i, c in enumerate(CONFIG_CASES)])
def test_bad_train_config_exits_2_naming_file_line_field(tmp_path: Path, capsys, no_model, change: str, field: str,
                                                          line: int | None) -> None:
    path = _config(tmp_path, change)
    code, err = _run_cli(["train", str(path)], capsys)
    assert code == 2, err
    assert err.startswith("losslab: error: ") and err.count("\n") <= 3, err
    assert f"{path}:{line}:" in err if line else str(path) in err, err
    assert field in err, err
    assert not (tmp_path / "out").exists()  # nothing written, nothing trained


@pytest.mark.parametrize("model", ["someone/not-a-model", "./no/such/dir"])
def test_a_model_that_cannot_be_found_exits_2(tmp_path: Path, capsys, monkeypatch, model: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _config(tmp_path, "").read_text().replace("builtin:tiny-llama", model)
    (tmp_path / "c.yaml").write_text(path)
    code, err = _run_cli(["train", str(tmp_path / "c.yaml")], capsys)
    assert code == 2 and f"model {model!r} could not be loaded" in err and "builtin:tiny-llama" in err, err


def test_set_override_errors_name_the_field(tmp_path: Path, capsys, no_model) -> None:
    path = _config(tmp_path, "")
    for override, field in (("training.lr=-1", "training.lr"), ("training=3", "training"), ("seed=abc", "seed")):
        code, err = _run_cli(["train", str(path), "--set", override], capsys)
        assert code == 2 and field in err, err
    code, err = _run_cli(["train", str(path), "--set", "novalue"], capsys)
    assert code == 2 and "KEY=VALUE" in err


@pytest.mark.parametrize(("text", "expected"), [
    (b"task: causal_lm\n\xff\n", r"cfg.yaml:2: not UTF-8"),
    (b"task: [causal_lm\n", r"cfg.yaml:2: invalid YAML"),
    (b"- a list\n", r"cfg.yaml: a config must be a YAML mapping"),
    (b"", r"cfg.yaml: a config must be a YAML mapping"),
    (b"seed: !!python/object/apply:os.system [echo]\n", r"cfg.yaml:1: invalid YAML"),
    (b"data:\n  train: a\n  train: b\n", r"cfg.yaml:3: field 'data.train': key given twice \(also on line 2\)"),
])
def test_unreadable_config(tmp_path: Path, capsys, text: bytes, expected: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text)
    for command in ("train", "compare"):
        code, err = _run_cli([command, str(path)], capsys)
        assert code == 2 and __import__("re").search(expected, err), err
    assert not (tmp_path / "out").exists()


# ---- data through `losslab train`, every task: exit 2 before the model is loaded ----------------

CHAT_LINE = json.dumps(CHAT)
TASK_DATA: dict[str, tuple[str, list[str]]] = {
    "causal_lm": ("", [CHAT_LINE, CHAT_LINE]),
    "sequence_classification": ("", [json.dumps({"text": "a", "label": "x"}), json.dumps({"text": "b", "label": "y"})]),
    "token_classification": ("", [json.dumps({"tokens": ["Ann"], "tags": ["B-PER"]}), json.dumps({"tokens": ["x"], "tags": ["O"]})]),
    "reward_model": ("", [json.dumps(GOOD["preference"]), json.dumps(GOOD["preference"])]),
    "embedding": ("", [CHAT_LINE, json.dumps({"messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "r"}]})]),
}
# (task, split with the bad record, bad line, extra config, what the message names)
DATA_CASES: list[tuple[str, str, str, str, str]] = [
    ("causal_lm", "train", '{"messages": [{"role": "robot", "content": "x"}]}', "", "'messages.0.role'"),
    ("causal_lm", "train", '{"messages": [{"role": "user", "content": "x"}]}', "", "no assistant turn"),
    ("causal_lm", "train", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "", "'messages.0.content'"),
    ("causal_lm", "validation", '{"messages": [', "", "invalid JSON"),
    ("causal_lm", "train", '{"instruction": "x", "output": "y"}', "", "'instruction'"),  # an instruction record in a chat file
    ("sequence_classification", "train", '{"text": "a", "label": 1.5}', "", "'label'"),
    ("sequence_classification", "validation", '{"text": "c", "label": "z"}', "", "unknown label 'z'"),
    ("sequence_classification", "train", '{"text": "c", "label": "z"}', "  label_names: [x, y]\n", "unknown label 'z'"),
    ("sequence_classification", "train", '{"text": "c", "label": 5}', "  label_type: class\n", "'label'"),
    ("sequence_classification", "train", '{"text": "c", "label": NaN}', "", "NaN"),
    ("sequence_classification", "train", '{"txt": "c", "label": "x"}', "", "'txt'"),
    ("token_classification", "train", '{"tokens": ["a", "b"], "tags": ["O"]}', "", "1 tags for 2 tokens"),
    ("token_classification", "validation", '{"tokens": ["a"], "tags": ["B-LOC"]}', "", "field 'tags': unknown label 'B-LOC'"),
    ("token_classification", "train", '{"tokens": ["a"], "tags": ["I-PER"]}', "  label_names: [O, B-PER]\n", "unknown label 'I-PER'"),
    ("token_classification", "train", '{"tokens": [], "tags": []}', "", "'tokens'"),
    ("reward_model", "train", '{"prompt": "p", "chosen": "a", "rejected": "a"}', "", "'rejected'"),
    ("reward_model", "train", '{"prompt": [], "chosen": "a", "rejected": "b"}', "", "'prompt'"),
    ("reward_model", "validation", '{"prompt": "p", "chosen": "a"}', "", "'rejected'"),
    ("reward_model", "train", '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": Infinity}', "", "Infinity"),
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
    path.write_text(yaml.safe_dump({
        "task": task, "model": model, "output_dir": str(tmp_path / "out"),
        "data": {**{k: str(v) for k, v in files.items()}, "on_error": on_error, "max_length": 64},
        "training": {"max_steps": 1, "batch_size": 2}, "eval": {"splits": []},
    }) .replace("data:\n", "data:\n" + extra), encoding="utf-8")
    return path


@pytest.mark.parametrize(("task", "split", "bad", "extra", "expected"), DATA_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(DATA_CASES)])
def test_bad_data_exits_2_before_the_model_loads(tmp_path: Path, capsys, no_model, task: str, split: str, bad: str,
                                                  extra: str, expected: str) -> None:
    path = _task_config(tmp_path, task, split, bad, extra)
    code, err = _run_cli(["train", str(path)], capsys)
    assert code == 2, err
    assert f"{tmp_path / split}.jsonl:2: " in err and expected in err, err


@pytest.mark.parametrize("task", sorted(TASK_DATA))
def test_good_data_reaches_the_model(tmp_path: Path, capsys, no_model, task: str) -> None:
    """The control of the test above: with good data the run gets as far as loading the model."""
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(["train", str(_task_config(tmp_path, task, "train", None, ""))])


def test_skipped_records_are_counted_and_listed_in_summary_json(tmp_path: Path, capsys) -> None:
    bad = [('{"text": "c", "label": NaN}', "invalid JSON (NaN"), ('{"text": 1, "label": "x"}', "field 'text'"),
           ('{"text": "c\\ud800", "label": "x"}', "field 'text': not valid Unicode"), ("{oops", "invalid JSON")]
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


# ---- compare configs ----------------------------------------------------------------------------

STUDY = """\
base_config: train.yaml
output_dir: {out}
variants:
  - name: ce
    overrides: {{}}
seeds: [0]
metrics:
  - name: train/steps
"""
COMPARE_CASES: list[tuple[str, str, str]] = [
    ("seeds: [0]\n", "seeds: []\n", "'seeds'"),
    ("seeds: [0]\n", "seeds: [0, 0]\n", "seeds must be distinct"),
    ("seeds: [0]\n", "seeds: [-1]\n", "'seed'"),
    ("    overrides: {}\n", "    overrides: {training.lr: -1}\n", "'training.lr'"),
    ("    overrides: {}\n", "    overrides: {loss.terms: [{name: nope}]}\n", "unknown loss 'nope'"),
    ("    overrides: {}\n", "    overrides: {training.warmup: 2.5}\n", "'training.warmup'"),
    ("    overrides: {}\n", "    overrides: {}\n    tune: {training.lr: {low: .nan, high: 1}}\n", "'variants.0.tune.training.lr.low'"),
    ("    overrides: {}\n", "    overrides: {}\n    tune: {training.lr: {low: 1, high: 0}}\n", "low"),
    ("    overrides: {}\n", "    overrides: {}\n    colour: red\n", "'variants.0.colour'"),
    ("  - name: ce\n", "  - name: c/e\n", "'variants.0.name'"),
    ("metrics:\n", "stats:\n  confidence: 1.5\nmetrics:\n", "'stats.confidence'"),
    ("metrics:\n", "stats:\n  n_bootstrap: 10\nmetrics:\n", "'stats.n_bootstrap'"),
    ("metrics:\n", "tuning:\n  trials: 0\nmetrics:\n", "'tuning.trials'"),
    ("  - name: train/steps\n", "  - name: train/steps\n    direction: up\n", "'metrics.0.direction'"),
    ("base_config: train.yaml\n", "base_config: missing.yaml\n", "config file not found"),
    ("base_config: train.yaml\n", "base_config: train.yaml\nbase: {task: causal_lm}\n", "exactly one of"),
]


@pytest.mark.parametrize(("old", "new", "expected"), COMPARE_CASES, ids=[f"compare-{i}" for i in range(len(COMPARE_CASES))])
def test_bad_compare_config_exits_2(tmp_path: Path, capsys, no_model, old: str, new: str, expected: str) -> None:
    train_cfg = _config(tmp_path, "")
    (tmp_path / "train.yaml").write_text(train_cfg.read_text(encoding="utf-8"), encoding="utf-8")
    study = tmp_path / "study.yaml"
    text = STUDY.format(out=tmp_path / "study_out")
    assert old in text
    study.write_text(text.replace(old, new, 1), encoding="utf-8")
    code, err = _run_cli(["compare", str(study)], capsys)
    assert code == 2 and str(study) in err or "train.yaml" in err, err
    assert expected in err, err
    assert not (tmp_path / "study_out").exists()


# ---- fuzzing configs ----------------------------------------------------------------------------

CONFIG_PATHS = ["seed", "task", "model", "dtype", "training.lr", "training.batch_size", "training.warmup", "training.epochs",
                "training.max_steps", "training.scheduler", "training.grad_accum", "data.max_length", "data.on_error",
                "data.mask", "data.role_weights", "loss.terms", "loss.terms.0.weight", "loss.terms.0.name",
                "eval.splits", "embedding.recall_at", "training.nope", "nope"]
ODD_VALUES = st.one_of(JSON_VALUES, st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, 0.5, 1.5, 2**40, "", "\x00", "1e-3"]),
                       st.fixed_dictionaries({"schedule": st.sampled_from(["cosine", "step", "bogus"]),
                                              "start": JSON_SCALARS}, optional={"end": JSON_SCALARS}))


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_PATHS), ODD_VALUES, min_size=1, max_size=3))
def test_fuzz_train_config_is_valid_or_a_user_error(changes: dict[str, Any]) -> None:
    from losslab.compare.config import set_dotted

    data = {"task": "sequence_classification", "model": "builtin:tiny-llama", "output_dir": "out", "data": {"train": "t.jsonl"},
            "loss": {"terms": [{"name": "cross_entropy", "weight": 1.0}]}}
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


# ---- the real command, as a user runs it ---------------------------------------------------------


@pytest.mark.parametrize("case", ["bad-record", "bad-config"])
def test_losslab_train_subprocess_exits_2_without_traceback(tmp_path: Path, case: str) -> None:
    if case == "bad-record":
        path = _task_config(tmp_path, "token_classification", "train", '{"tokens": ["a", "b"], "tags": ["O"]}', "")
        expected = f"{tmp_path / 'train.jsonl'}:2: field 'tags': 1 tags for 2 tokens"
    else:
        path = _config(tmp_path, "training:\n  warmup: 1.5\n")
        expected = f"{path}:7: field 'training.warmup'"
    done = subprocess.run([sys.executable, "-m", "losslab.cli", "train", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and expected in done.stderr, done.stderr
    assert not (tmp_path / "out" / "model").exists()
