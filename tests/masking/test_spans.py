"""Character regions -> token labels and weights (synthetic offsets, every boundary case; trimmed
offsets from a real tokenizer)."""

from __future__ import annotations

import copy

import pytest
from tokenizers import processors

from losslab.masking.build import MaskBuilder
from losslab.masking.spans import IGNORE_INDEX, Region, label_tokens
from losslab.masking.strategy import close_text, common_prefix_len

X = IGNORE_INDEX


def test_tokens_overlapping_a_region_are_trained_with_its_weight() -> None:
    # text: "HEAD|content|END|next" ; tokens straddle both ends of the region [5, 16)
    offsets = [(0, 4), (4, 6), (6, 12), (12, 17), (17, 21)]
    ids = [10, 11, 12, 13, 14]
    labels, weights = label_tokens(ids, offsets, [Region(5, 16, 0.5)])
    assert labels == [X, 11, 12, 13, X]  # (4, 6) starts in the header but holds content: trained
    assert weights == [0.0, 0.5, 0.5, 0.5, 0.0]


def test_default_weight_zero_width_tokens_and_weight_zero() -> None:
    offsets = [(0, 0), (0, 3), (3, 6), (6, 9), (9, 9)]
    labels, weights = label_tokens([1, 2, 3, 4, 5], offsets, [Region(3, 6, 0.0), Region(6, 9, 2.0)], default_weight=1.0)
    assert labels == [X, 2, X, 4, 5]  # (0, 0): added by a post-processor; (9, 9) ends the region
    assert weights == [0.0, 1.0, 0.0, 2.0, 2.0]


def test_a_zero_width_token_follows_the_character_before_it() -> None:
    # ByteLevel(trim_offsets=True) gives a whitespace-only token that ends at p the offsets (p, p)
    offsets = [(0, 4), (4, 4), (6, 6), (6, 9), (11, 11), (12, 12), (12, 15)]
    labels, weights = label_tokens([1, 2, 3, 4, 5, 6, 7], offsets, [Region(4, 11, 0.5)])
    assert labels == [X, X, 3, 4, 5, X, X]  # (4, 4) ends before the region, (12, 12) after it
    assert weights == [0.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.0]


def test_trimmed_offsets_train_the_whitespace_tokens_of_a_reply(tokenizer) -> None:
    """GPT-2-style tokenizer.json files post-process with ByteLevel(trim_offsets=True): a
    whitespace-only token inside a reply gets zero-width offsets, and is trained all the same."""
    trimmed = copy.deepcopy(tokenizer)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    record = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "def f():\n    return  1\n\n\nx =   2"},
        ]
    }
    (want,) = MaskBuilder(tokenizer).iter_sequences([record])
    (got,) = MaskBuilder(trimmed).iter_sequences([record])
    assert sum(start == end for start, end in got.offsets) >= 3 and got.offsets != want.offsets
    assert got.input_ids == want.input_ids
    assert got.labels == want.labels and got.weights == want.weights


def test_many_regions_and_empty_ones() -> None:
    offsets = [(i, i + 1) for i in range(10)]
    regions = [Region(1, 2, 1.0), Region(4, 4, 9.0), Region(5, 8, 3.0)]
    labels, weights = label_tokens(list(range(10)), offsets, regions)
    assert labels == [X, 1, X, X, X, 5, 6, 7, X, X]
    assert weights == [0, 1, 0, 0, 0, 3, 3, 3, 0, 0]


def test_overlapping_regions_are_a_bug() -> None:
    with pytest.raises(ValueError, match="overlapping"):
        label_tokens([1], [(0, 1)], [Region(0, 5, 1.0), Region(3, 6, 1.0)])


def test_close_text_and_common_prefix() -> None:
    assert close_text("<|im_end|>\n") == "<|im_end|>"
    assert close_text("</s>") == "</s>"
    assert close_text("\n\n") == "\n\n"  # a template whose only end of turn is whitespace keeps it
    assert close_text("") == ""
    assert common_prefix_len("abcdef", "abcxyz") == 3
    assert common_prefix_len("abc", "abc") == 3
    assert common_prefix_len("", "abc") == 0
    assert common_prefix_len("ab" * 1000 + "x", "ab" * 1000 + "y") == 2000
