"""The embedded datasets: documented counts and splits, contract schemas, stable splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from losslab.cli import main
from losslab.data.builtin import SPLITS, prepare, resolve_data_path, split_of
from losslab.data.records import load_records
from losslab.data.schemas import SCHEMAS
from losslab.data.sources import SOURCES, sentiment_class

# The figures documented in docs/data.md (records, train, validation, test).
EXPECTED = {
    "chitchat": (4003, 3196, 405, 402),
    "chatterbot": (898, 706, 82, 110),
    "sentiment": (23628, 18906, 2336, 2386),
    "sentiment_regression": (23699, 18965, 2342, 2392),
    "preference": (7248, 5832, 688, 728),
    "ner": (2309, 1828, 237, 244),
    "translation": (722, 580, 68, 74),
}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "data.md"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    assert main(["data", "prepare", "--out", str(out)]) == 0
    return out


def test_every_source_is_expected() -> None:
    assert set(SOURCES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_schema_and_splits(prepared: Path, name: str) -> None:
    manifest = json.loads((prepared / name / "manifest.json").read_text())
    records, *splits = EXPECTED[name]
    assert manifest["records"] == records
    assert [manifest["splits"][s] for s in SPLITS] == splits
    schema = SCHEMAS[SOURCES[name].schema]
    seen: set[str] = set()
    for split, expected in zip(SPLITS, splits):
        path = prepared / name / f"{split}.jsonl"
        rows = list(load_records(path, schema))  # raises on any record that breaks the contract
        assert len(rows) == expected
        keys = {json.dumps(r.model_dump(), sort_keys=True) for _, r in rows}
        assert not keys & seen, f"{name}: a record appears in two splits"
        seen |= keys


def test_documented_counts(prepared: Path) -> None:
    text = DOCS.read_text()
    for name, (records, train, val, test) in EXPECTED.items():
        row = f"| `{name}` |"
        line = next((ln for ln in text.splitlines() if ln.startswith(row)), None)
        assert line is not None, f"docs/data.md has no row for {name}"
        cells = [c.strip().replace(",", "") for c in line.split("|")]
        assert [str(records), str(train), str(val), str(test)] == cells[3:7], line


def test_chat_records_alternate_and_end_with_assistant(prepared: Path) -> None:
    for name in ("chitchat", "chatterbot"):
        for _, rec in load_records(prepared / name / "train.jsonl", SCHEMAS["chat"]):
            roles = [m.role for m in rec.messages]
            assert roles[-1] == "assistant" and len(roles) % 2 == 0
            assert all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))
            assert all(m.content for m in rec.messages)


def test_preference_pairs_are_ordered(prepared: Path) -> None:
    for _, rec in load_records(prepared / "preference" / "train.jsonl", SCHEMAS["preference"]):
        assert rec.margin is not None and rec.margin >= 1.0 and rec.chosen != rec.rejected


def test_sentiment_thresholds() -> None:
    assert [sentiment_class(x) for x in (-4, -0.51, -0.5, 0, 0.5, 0.51, 4)] == [
        "negative",
        "negative",
        "neutral",
        "neutral",
        "neutral",
        "positive",
        "positive",
    ]


def test_split_is_a_function_of_the_key() -> None:
    keys = [f"k{i}" for i in range(5000)]
    splits = [split_of(k) for k in keys]
    assert splits == [split_of(k) for k in keys]
    share = splits.count("train") / len(keys)
    assert 0.77 < share < 0.83


def test_prepare_is_idempotent_and_builtin_paths_resolve(prepared: Path, monkeypatch) -> None:
    before = (prepared / "ner" / "train.jsonl").read_bytes()
    prepare(["ner"], prepared, force=True)
    assert (prepared / "ner" / "train.jsonl").read_bytes() == before
    monkeypatch.setenv("LOSSLAB_CACHE", str(prepared.parent))
    (prepared.parent / "data").mkdir(exist_ok=True)
    assert resolve_data_path("builtin:ner", "test").read_bytes() == (prepared / "ner" / "test.jsonl").read_bytes()


def test_unknown_dataset_is_a_user_error(capsys) -> None:
    assert main(["data", "prepare", "--only", "wikipedia"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
