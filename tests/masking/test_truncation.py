"""Truncation keeps the start or the end; samples left with no trained token are dropped and counted."""

from __future__ import annotations

import pytest

from losslab.errors import UserError
from losslab.masking.build import BuildStats, MaskBuilder, MaskConfig
from losslab.masking.spans import IGNORE_INDEX
from losslab.masking.truncation import truncate, truncation_slice

LONG_USER = "word " * 200
MESSAGES = [{"role": "user", "content": LONG_USER}, {"role": "assistant", "content": "short reply"}]


def test_truncate() -> None:
    assert truncate([1, 2, 3, 4], 2, "end") == [1, 2]
    assert truncate([1, 2, 3, 4], 2, "start") == [3, 4]
    assert truncate([1, 2], 5) == [1, 2]
    assert truncation_slice(4, None) == slice(0, 4)
    with pytest.raises(UserError, match="truncation must be"):
        truncate([1], 1, "middle")


def test_cutting_the_end_drops_a_sample_whose_reply_is_cut_away(tokenizer) -> None:
    stats = BuildStats()
    builder = MaskBuilder(tokenizer, MaskConfig(max_length=64, truncation="end"))
    assert list(builder.iter_sequences([{"messages": MESSAGES}], stats)) == []
    assert stats.samples == 0 and stats.dropped_samples == 1
    assert "dropped samples: 1 (1 with no trained token left after truncation)" in stats.summary()


def test_cutting_the_start_keeps_the_reply(tokenizer) -> None:
    stats = BuildStats()
    builder = MaskBuilder(tokenizer, MaskConfig(max_length=64, truncation="start"))
    (seq,) = builder.iter_sequences([{"messages": MESSAGES}], stats)
    assert len(seq.input_ids) == 64 and len(seq.labels) == 64 and len(seq.weights) == 64
    trained = tokenizer.decode([t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE_INDEX])
    assert trained == "short reply<|im_end|>"
    assert stats.dropped_samples == 0 and stats.tokens == 64


def test_expand_truncates_and_drops_per_sample(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": LONG_USER},
        {"role": "assistant", "content": "ok"},
    ]
    stats = BuildStats()
    builder = MaskBuilder(tokenizer, MaskConfig(max_length=48, truncation="end", strategy="expand"))
    seqs = list(builder.iter_sequences([{"messages": messages}], stats))
    assert [s.turn for s in seqs] == [1]  # turn 3 is cut away: dropped, counted
    assert stats.dropped_samples == 1 and stats.samples == 1


def test_all_weights_zero_is_dropped_and_counted(tokenizer) -> None:
    stats = BuildStats()
    record = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}
    assert list(MaskBuilder(tokenizer).iter_sequences([record], stats)) == []
    assert stats.dropped_samples == 1 and stats.records == 1


def test_the_first_token_is_never_a_target(tokenizer) -> None:
    """The loss predicts token t from the tokens before it, so nothing predicts the first token:
    it is not trained, not counted, and a sample trained only there is dropped."""
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Hello there"}]
    stats = BuildStats()
    builder = MaskBuilder(tokenizer, MaskConfig(max_length=2, truncation="start"))
    assert list(builder.iter_sequences([{"messages": messages}], stats)) == []  # left: <|im_end|> "\n"
    assert stats.dropped == {"with no trained token left after truncation": 1} and stats.trained_tokens == 0
    stats = BuildStats()
    (seq,) = MaskBuilder(tokenizer, MaskConfig(mask="all")).iter_sequences([{"messages": messages}], stats)
    assert seq.labels[0] == IGNORE_INDEX and seq.weights[0] == 0.0
    assert seq.trained == stats.trained_tokens == len(seq.input_ids) - 1
