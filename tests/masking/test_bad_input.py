"""Bad input to build_samples and the collators: errors name the record's line and field, a fully
truncated answer is dropped and listed; fuzzed conversations and samples. The contract: tests/bad_input.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import losslab.models
from losslab.errors import UserError
from losslab.masking import BuildStats, MaskConfig, PackedCollator, PaddedCollator, build_samples
from losslab.masking.spans import IGNORE_INDEX

from ..bad_input import CHAT, FUZZ, re_escape

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


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"text": "no kind"}', "data.jsonl:1: cannot tell the record kind"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "data.jsonl:1: the conversation has no assistant turn"),
        (
            '{"messages": [{"role": "user", "content": "\\udc00"}, {"role": "assistant", "content": "b"}]}',
            "data.jsonl:1: field 'messages.0.content': not valid Unicode",
        ),
        ('{"instruction": "x", "output": 1}', "data.jsonl:1: field 'output'"),
    ],
)
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
    assert (
        len(samples) == 1
        and stats.skipped.count == 1
        and "field 'mesages'" in stats.skipped.examples[0]
        and stats.skipped.examples[0].startswith(f"{path}:1: ")
    )


TEXT = st.text(alphabet=st.characters(codec="utf-8", categories=None), max_size=20) | st.sampled_from(
    ["", "\x00", "\x1b[0m", "\ue000", "<|im_end|>", "<|im_start|>assistant\n", "\n\n"]
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": TEXT},
    optional={"weight": st.sampled_from([0, 0.5, 1, 2.0])},
)


@FUZZ
@given(
    records=st.lists(
        st.fixed_dictionaries({"messages": st.lists(MESSAGE, min_size=1, max_size=4)}), min_size=1, max_size=3
    ),
    max_length=st.sampled_from([None, 8, 24, 64]),
    mask=st.sampled_from([None, "last", "all"]),
)
def test_fuzz_build_samples(tiny_tokenizer, records: list[dict], max_length: int | None, mask: str | None) -> None:
    """Any conversation: samples (labels are -100 or the token, within max_length), a dropped and
    listed sample, or a counted skip; never another exception."""
    stats = BuildStats()
    samples = build_samples(
        records, tiny_tokenizer, MaskConfig(on_error="skip", max_length=max_length, mask=mask), stats=stats
    )
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
        assert (
            batch["labels"].shape
            == batch["input_ids"].shape
            == (len(samples), max(len(s["input_ids"]) for s in samples))
        )


@pytest.mark.parametrize(
    "collator",
    [PaddedCollator(0), PackedCollator(), PackedCollator(flash_attn_kwargs=True)],
    ids=["padded", "packed", "packed-flash"],
)
@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        ({"input_ids": [1, 2], "labels": [1]}, "sample 1 of the batch: field 'labels': 1 entries for 2 input_ids"),
        ({"input_ids": [1, 2], "labels": [1, 2], "weights": [1.0]}, "field 'weights': 1 entries for 2 input_ids"),
        ({"input_ids": [1], "labels": [1, 1], "source": {"file": "d.jsonl", "line": 7}}, "d.jsonl:7: field 'labels'"),
    ],
)
def test_collators_refuse_misaligned_samples(collator, sample: dict, expected: str) -> None:
    good = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    with pytest.raises(UserError, match=re_escape(expected)):
        collator([good, sample])


def test_packed_collator_with_only_empty_samples() -> None:
    batch = PackedCollator(flash_attn_kwargs=True)([{"input_ids": [], "labels": []}])
    assert batch["input_ids"].shape == (1, 0) and batch["max_length_q"] == 0


SAMPLES = st.lists(
    st.integers(0, 6).flatmap(
        lambda n: st.fixed_dictionaries(
            {
                "input_ids": st.lists(st.integers(1, 99), min_size=n, max_size=n),
                "labels": st.lists(st.sampled_from([IGNORE_INDEX, 1]), min_size=n, max_size=n),
                "weights": st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n, max_size=n),
            }
        )
    ),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(samples=SAMPLES, side=st.sampled_from(["right", "left"]))
def test_fuzz_collators_against_a_plain_reference(samples: list[dict], side: str) -> None:
    padded = PaddedCollator(0, padding_side=side)(samples)
    width = max(len(s["input_ids"]) for s in samples)
    for b, s in enumerate(samples):
        pad = width - len(s["input_ids"])
        row = (
            (lambda xs, v, pad=pad: list(xs) + [v] * pad)
            if side == "right"
            else (lambda xs, v, pad=pad: [v] * pad + list(xs))
        )
        assert padded["input_ids"][b].tolist() == row(s["input_ids"], 0)
        assert padded["labels"][b].tolist() == row(s["labels"], IGNORE_INDEX)
        assert padded["weights"][b].tolist() == row(s["weights"], 0.0)
        assert padded["attention_mask"][b].tolist() == row([1] * len(s["input_ids"]), 0)
    packed = PackedCollator(flash_attn_kwargs=True)(samples)
    kept = [s for s in samples if s["input_ids"]]
    assert packed["input_ids"][0].tolist() == [t for s in kept for t in s["input_ids"]]
    assert packed["labels"][0].tolist() == [x for s in kept for x in [IGNORE_INDEX, *s["labels"][1:]]]
    assert packed["position_ids"][0].tolist() == [i for s in kept for i in range(len(s["input_ids"]))]
    assert packed["cu_seq_lens_q"].tolist() == [
        sum(len(s["input_ids"]) for s in kept[:i]) for i in range(len(kept) + 1)
    ]
