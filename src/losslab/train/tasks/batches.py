"""Batches of the encoder-style tasks: tokenising with a chosen truncation side, padding, the
model's inputs, and evaluation batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from losslab.train.config import TrainConfig

MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def encode(
    tokenizer: Any, text: Any, pair: Any = None, *, max_length: int, drop: str = "end", **kwargs: Any
) -> tuple[dict[str, Any], bool]:
    """Tokenise ``text`` (and ``pair``) to at most ``max_length`` tokens, special tokens included.

    ``drop``: which end of a too-long text is cut (``"end"`` keeps the start, ``"start"``
    keeps the end); a pair loses tokens from its longer member. Returns the encoding
    (``input_ids``, ``token_type_ids`` when the tokenizer makes them, and ``word_ids`` with
    ``is_split_into_words=True``) and whether anything was cut.
    """
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "right" if drop == "end" else "left"
    try:
        enc = tokenizer(text, pair, truncation=True, max_length=max_length, **kwargs)
        truncated = (
            len(enc["input_ids"]) >= max_length and len(tokenizer(text, pair, **kwargs)["input_ids"]) > max_length
        )
    finally:
        tokenizer.truncation_side = side
    out = {"input_ids": list(enc["input_ids"])}
    if "token_type_ids" in enc:
        out["token_type_ids"] = list(enc["token_type_ids"])
    if kwargs.get("is_split_into_words"):
        out["word_ids"] = enc.word_ids()
    return out, truncated


def pad(rows: Sequence[Sequence[int | float]], value: int | float, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) right-padded to the longest row with ``value``."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype)


def collate_texts(encodings: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (and ``token_type_ids``) of encoded texts, right-padded."""
    ids = [e["input_ids"] for e in encodings]
    batch = {
        "input_ids": pad(ids, pad_id, torch.long),
        "attention_mask": pad([[1] * len(r) for r in ids], 0, torch.long),
    }
    if all("token_type_ids" in e for e in encodings):
        batch["token_type_ids"] = pad([e["token_type_ids"] for e in encodings], 0, torch.long)
    return batch


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The forward arguments of an encoder or decoder (ids, mask, token types) from a batch."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def eval_batches(
    model: torch.nn.Module, dataset: Sequence[dict], collator: Callable[[list[dict]], dict[str, Any]], batch_size: int
) -> Iterator[dict[str, Any]]:
    """Collated batches of ``dataset`` on the model's device, with the model in eval mode
    (restored afterwards). Call it under ``torch.no_grad()`` and exhaust it."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collator(list(dataset[start : start + batch_size]))
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    finally:
        model.train(was_training)


def eval_batch_size(config: TrainConfig) -> int:
    return config.training.eval_batch_size or config.training.batch_size
