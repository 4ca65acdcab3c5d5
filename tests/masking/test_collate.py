"""Collators: padding (labels -100, attention mask, weights 0) and packing (restarting position
ids, a label boundary between samples, weights carried)."""

from __future__ import annotations

import pytest
import torch

from losslab.errors import UserError
from losslab.masking.collate import PackedCollator, PaddedCollator, block_causal_mask, pack_greedy

X = -100
A = {"input_ids": [5, 6, 7], "labels": [X, 6, 7], "weights": [0.0, 1.0, 0.5], "source": {"file": "f", "line": 1}}
B = {"input_ids": [8, 9], "labels": [8, 9], "weights": [2.0, 2.0]}


def test_padded_right_and_left() -> None:
    out = PaddedCollator(pad_token_id=0)([A, B])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[X, 6, 7], [8, 9, X]]
    assert out["weights"].tolist() == [[0.0, 1.0, 0.5], [2.0, 2.0, 0.0]]
    left = PaddedCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)([A, B])
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 8, 9]]
    assert left["labels"].tolist() == [[X, X, 6, 7], [X, X, 8, 9]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]


def test_weights_default_to_one_on_trained_tokens() -> None:
    out = PaddedCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": [X, 2]}])
    assert out["weights"].tolist() == [[0.0, 1.0]]


def test_packed_row() -> None:
    out = PackedCollator()([A, B])
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["labels"].tolist() == [[X, 6, 7, X, 9]]  # 7 must not learn to predict 8
    assert out["weights"].tolist() == [[0.0, 1.0, 0.5, 0.0, 2.0]]
    assert "attention_mask" not in out and out["use_cache"] is False  # packing seen from position_ids


def test_packed_flash_kwargs_and_block_mask() -> None:
    out = PackedCollator(flash_attn_kwargs=True, block_mask_dtype=torch.float64)([A, B])
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5] and out["max_length_k"] == 3
    mask = out["attention_mask"]
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.float64
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert torch.equal(block_causal_mask([3, 2], torch.float64), mask)


def test_pack_greedy() -> None:
    rows = pack_greedy([5, 3, 4, 2, 6], max_tokens=8)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 4, 2, 6][i] for i in r) <= 8 for r in rows)
    assert len(rows) == 3
    with pytest.raises(UserError, match="more than the packing length"):
        pack_greedy([9], max_tokens=8)
