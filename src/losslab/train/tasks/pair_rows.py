"""Batch layouts for preference data: chosen and rejected completions (or unpaired ones) in rows
a causal LM scores in one forward, and the positions whose predictions give each completion's
log-prob.

Input: encoded records, token ids only (the template's end-of-turn tokens that are trained
belong to the completions):

- a pair ``{"prompt": [ids], "chosen": [ids], "rejected": [ids]}``;
- an unpaired item ``{"prompt": [ids], "completion": [ids]}`` (optional ``"desirable": bool``,
  default True: an undesirable completion gets no ``labels``).

Layouts of :func:`pair_batch` (B pairs):

- ``concat``: 2B rows, ``prompt + chosen`` for every pair, then ``prompt + rejected``; right-padded,
  2D ``attention_mask``. The prompt is computed twice.
- ``shared`` (prefix sharing): B rows ``prompt + chosen + rejected``; a 4D attention mask in
  which prompt and chosen are causal, and rejected sees the prompt and itself (causally) but
  not chosen; rejected's ``position_ids`` continue from the prompt's end, as if chosen were not
  there. The prompt is computed once.
- ``packed``: shared blocks packed one after another in rows of at most ``row_tokens`` tokens
  (None: all in one row), the mask block-diagonal (no block sees another), no padding between
  blocks, ``position_ids`` restarting at 0 for each block.

:func:`item_batch` lays out unpaired items: ``padded`` (one row each, 2D mask) or ``packed``.

Every batch is a dict (R rows of T tokens):

- ``input_ids`` (R, T) int64, padded with ``pad_id``;
- ``attention_mask``: (R, T) int64 (1 = token, 0 = padding) for ``concat`` / ``padded``; (R, 1, T, T)
  additive float (``mask_dtype``, default float32: 0 = attend, ``finfo(mask_dtype).min`` = not)
  for ``shared`` / ``packed``. Pass the batch through :func:`model_inputs` before the forward:
  it gives the 4D mask in the form the model's attention needs (see there). A padding position
  attends to itself only (a query that sees nothing gives NaN in some kernels, and a NaN
  reaches real tokens through the keys);
- ``position_ids`` (R, T) int64 (padding: 0). Needed: with a 4D mask the model cannot infer them;
- ``labels`` (R, T) int64, unshifted like causal-LM labels: the token id at each chosen (pair
  layouts) or desirable (items) completion token, -100 elsewhere. Position t - 1 predicts
  ``labels[:, t]`` in every layout (chosen directly follows its prompt), so the token
  cross-entropy term on ``labels`` is the NLL of chosen completions, and the Trainer's
  ``num_items_in_batch`` (``labels[..., 1:] != -100``) counts chosen completion tokens. Its
  ``num_sequences`` (rows with a trained label) counts pairs for ``concat`` (the rejected rows
  have no labels) and ``shared`` (one row per pair), but ROWS for ``packed`` (several pairs per
  row): with packed rows, take the pair count from ``num_segments // 2`` instead;
- ``score_positions`` (M,) int64: for each scored completion token, the index in the flattened
  (R * T) hidden states of the position that predicts it (for the first token of rejected in a
  shared row: the prompt's last position); ``targets`` (M,) int64 the token; ``segments`` (M,)
  int64: pair i's chosen tokens -> i, rejected -> B + i (items: item i -> i); every completion
  token is scored, M = all completion tokens;
- ``num_segments`` (int): 2B for pairs, B for items.

:func:`model_inputs` gives a model's forward arguments from a batch;
:func:`batch_sequence_logps` runs a causal LM on a batch and returns the per-segment sums and
counts (``sums[:B]`` chosen, ``sums[B:]`` rejected).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from losslab.labels import IGNORE_INDEX
from losslab.losses.logprobs import fused_sequence_logps, sequence_logps

PAIR_LAYOUTS = ("concat", "shared", "packed")
ITEM_LAYOUTS = ("padded", "packed")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
"""The batch keys a causal LM's forward takes."""

# part of a position within its block: the prompt, the first completion, a completion that must
# not see the first (rejected in a shared block); padding is none of them
_PROMPT, _FIRST, _SECOND, _PAD = 0, 1, 2, 3


@dataclass
class _Completion:
    ids: Sequence[int]
    segment: int
    trained: bool


@dataclass
class _Row:
    """One row under construction: per position its token, position id, block, part and label;
    the scored completion tokens as (predicting position, target, segment)."""

    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    block: list[int] = field(default_factory=list)
    part: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    scored: list[tuple[int, int, int]] = field(default_factory=list)
    blocks: int = 0

    def add(self, prompt: Sequence[int], completions: Sequence[_Completion]) -> None:
        """A block: ``prompt`` then each completion, every completion continuing the prompt's
        positions (the second one sees the prompt, not the first)."""
        if not prompt:
            raise ValueError("a prompt must have at least one token (it predicts the completion's first token)")
        block, start, p = self.blocks, len(self.ids), len(prompt)
        self.blocks += 1
        self._extend(prompt, range(p), block, _PROMPT, [IGNORE_INDEX] * p)
        for k, completion in enumerate(completions):
            ids = list(completion.ids)
            if completion.trained and k > 0:
                raise ValueError("only the completion right after the prompt can have labels")
            offset = len(self.ids)
            labels = ids if completion.trained else [IGNORE_INDEX] * len(ids)
            self._extend(ids, range(p, p + len(ids)), block, _FIRST + k, labels)
            for j, token in enumerate(ids):
                predictor = offset + j - 1 if j > 0 else start + p - 1
                self.scored.append((predictor, token, completion.segment))

    def _extend(self, ids: Sequence[int], pos: range, block: int, part: int, labels: Sequence[int]) -> None:
        self.ids.extend(ids)
        self.pos.extend(pos)
        self.block.extend([block] * len(ids))
        self.part.extend([part] * len(ids))
        self.labels.extend(labels)


def _tensors(rows: Sequence[_Row], pad_id: int, mask: str, mask_dtype: torch.dtype, num_segments: int) -> dict:
    """The batch dict of finished rows; ``mask`` "2d" or "4d"."""
    width = max(len(r.ids) for r in rows)

    def padded(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)

    input_ids = padded([r.ids for r in rows], pad_id)  # (R, T)
    part = padded([r.part for r in rows], _PAD)
    real = part != _PAD
    batch: dict[str, Any] = {"input_ids": input_ids}
    if mask == "2d":
        batch["attention_mask"] = real.long()
    else:
        batch["attention_mask"] = attention_bias(_allowed(padded([r.block for r in rows], -1), part), mask_dtype)
    batch["position_ids"] = padded([r.pos for r in rows], 0)
    batch["labels"] = padded([r.labels for r in rows], IGNORE_INDEX)
    scored = [(i * width + t, y, s) for i, r in enumerate(rows) for t, y, s in r.scored]
    table = torch.tensor(scored, dtype=torch.long).reshape(-1, 3)  # (M, 3)
    batch["score_positions"], batch["targets"], batch["segments"] = (table[:, k].contiguous() for k in range(3))
    batch["num_segments"] = num_segments
    return batch


def _allowed(block: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """(R, 1, T, T) bool: query q may attend to key k. Causal, within one block, and a second
    completion never sees the first; a padding position sees itself only."""
    width = block.shape[1]
    index = torch.arange(width)
    block = torch.where(part == _PAD, -1 - index, block)  # every padding position its own block
    q_block, k_block = block.unsqueeze(2), block.unsqueeze(1)  # (R, T, 1), (R, 1, T)
    causal = index.unsqueeze(1) >= index.unsqueeze(0)  # (T, T): k <= q
    hidden = (part.unsqueeze(2) == _SECOND) & (part.unsqueeze(1) == _FIRST)
    return ((q_block == k_block) & causal & ~hidden).unsqueeze(1)


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An additive attention mask from a bool one (True = attend): 0 where allowed,
    ``finfo(dtype).min`` where not (finite, as transformers' own masks: no inf - inf)."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


def _pairs_of(records: Sequence[Mapping[str, Sequence[int]]]) -> list[tuple[Sequence[int], ...]]:
    try:
        return [(r["prompt"], r["chosen"], r["rejected"]) for r in records]
    except KeyError as err:
        raise ValueError(f"a pair needs prompt, chosen and rejected token ids; missing {err}") from None


def _packed(blocks: Sequence[tuple[Sequence[int], list[_Completion]]], row_tokens: int | None) -> list[_Row]:
    """Blocks in order, a new row when the next block would take the row past ``row_tokens``
    (a block longer than that gets a row of its own)."""
    rows = [_Row()]
    for prompt, completions in blocks:
        size = len(prompt) + sum(len(c.ids) for c in completions)
        if row_tokens is not None and rows[-1].ids and len(rows[-1].ids) + size > row_tokens:
            rows.append(_Row())
        rows[-1].add(prompt, completions)
    return rows


def _check(layout: str, layouts: tuple[str, ...], records: Sequence[Any], row_tokens: int | None) -> None:
    if layout not in layouts:
        raise ValueError(f"layout must be one of {', '.join(layouts)}; got {layout!r}")
    if not records:
        raise ValueError("a batch needs at least one record")
    if row_tokens is not None and row_tokens < 1:
        raise ValueError(f"row_tokens must be >= 1; got {row_tokens}")


def pair_batch(
    pairs: Sequence[Mapping[str, Sequence[int]]],
    *,
    layout: str,
    pad_id: int,
    row_tokens: int | None = None,
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The batch of B encoded pairs in ``layout`` (``concat``, ``shared`` or ``packed``).

    ``row_tokens``: the most tokens of a ``packed`` row (None: every pair in one row; ignored by
    the other layouts). ``mask_dtype``: the dtype of the 4D additive mask. Keys and shapes: the
    module docstring; segments: chosen of pair i -> i, rejected -> B + i. Every prompt must have
    a token (ValueError otherwise); an empty completion is an empty segment (sum 0, count 0).
    """
    _check(layout, PAIR_LAYOUTS, pairs, row_tokens)
    triples = _pairs_of(pairs)
    b = len(triples)
    if layout == "concat":
        rows = []
        for k in range(2):  # chosen rows, then rejected rows
            for i, (prompt, *completions) in enumerate(triples):
                row = _Row()
                row.add(prompt, [_Completion(completions[k], k * b + i, trained=k == 0)])
                rows.append(row)
        return _tensors(rows, pad_id, "2d", mask_dtype, 2 * b)
    blocks = [
        (prompt, [_Completion(chosen, i, trained=True), _Completion(rejected, b + i, trained=False)])
        for i, (prompt, chosen, rejected) in enumerate(triples)
    ]
    rows = _packed(blocks, row_tokens if layout == "packed" else 0)  # 0: a row per block
    return _tensors(rows, pad_id, "4d", mask_dtype, 2 * b)


def item_batch(
    items: Sequence[Mapping[str, Any]],
    *,
    layout: str,
    pad_id: int,
    row_tokens: int | None = None,
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The batch of B encoded unpaired items ``{"prompt", "completion", "desirable"?}`` in
    ``layout`` (``padded``: one row each, 2D mask; ``packed``: as :func:`pair_batch`).
    Segments: item i -> i. ``labels`` mark the completions of desirable items (all, when no
    item says ``desirable``)."""
    _check(layout, ITEM_LAYOUTS, items, row_tokens)
    try:
        blocks = [
            (r["prompt"], [_Completion(r["completion"], i, trained=bool(r.get("desirable", True)))])
            for i, r in enumerate(items)
        ]
    except KeyError as err:
        raise ValueError(f"an unpaired item needs prompt and completion token ids; missing {err}") from None
    if layout == "padded":
        return _tensors(_packed(blocks, 0), pad_id, "2d", mask_dtype, len(items))  # 0: a row per item
    return _tensors(_packed(blocks, row_tokens), pad_id, "4d", mask_dtype, len(items))


def model_inputs(batch: Mapping[str, Any], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The forward arguments (``input_ids``, ``attention_mask``, ``position_ids``) of a
    :func:`pair_batch` / :func:`item_batch` batch for ``model``, a 4D mask in the form its
    attention implementation needs.

    transformers (5.24, ``masking_utils._preprocess_mask_arguments``) uses a 4D mask as given,
    whatever its dtype, and ignores ``position_ids`` for masking then (no packed-sequence
    detection). Its ``eager`` attention ADDS the mask to the scores, so a bool mask would be read
    as 0/1 and silently do nothing: eager gets the additive mask in the model's dtype. ``sdpa``
    gets a bool mask (what transformers builds for it itself): PyTorch 2.13's CPU SDPA gives wrong
    results for a float32 additive mask with float64 queries (sequences of 20+ tokens). Other
    implementations (flash attention kernels) take no arbitrary 4D mask: ValueError.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    mask = inputs["attention_mask"]
    if mask.dim() != 4:
        return inputs
    allowed = mask if mask.dtype == torch.bool else mask == 0
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl == "sdpa":
        inputs["attention_mask"] = allowed
    elif impl == "eager":
        dtype = next(model.parameters()).dtype
        inputs["attention_mask"] = attention_bias(allowed, dtype if dtype.is_floating_point else torch.float32)
    else:
        raise ValueError(
            f"shared and packed rows need attn_implementation sdpa or eager (a 4D attention mask); the model has {impl!r}"
        )
    return inputs


def batch_sequence_logps(
    model: torch.nn.Module, batch: Mapping[str, Any], *, fused: bool = True, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment completion log-prob sums and token counts (S,) of a :func:`pair_batch` /
    :func:`item_batch` batch under a causal LM, in one forward.

    The model (inputs from :func:`model_inputs`) returns its last hidden states (no logits:
    ``logits_to_keep`` empty); the states at ``score_positions`` go through the LM head with
    :func:`fused_sequence_logps` (``fused=False``: their logits, then :func:`sequence_logps`).
    Differentiable; call under ``torch.no_grad()`` for a reference model. The LM head must give
    the model's logits (:func:`losslab.train.next_token.lm_head_gives_logits`).
    """
    inputs = model_inputs(batch, model)
    device = inputs["input_ids"].device
    out = model(**inputs, output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long, device=device))
    hidden = out.hidden_states[-1]  # (R, T, D)
    scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["score_positions"])  # (M, D)
    head = model.get_output_embeddings()  # type: ignore[operator]
    weight, bias = head.weight, getattr(head, "bias", None)
    targets, segments, num_segments = batch["targets"], batch["segments"], int(batch["num_segments"])
    if fused:
        return fused_sequence_logps(scored, weight, targets, segments, num_segments, bias=bias, chunk_size=chunk_size)
    return sequence_logps(head(scored), targets, segments, num_segments)


__all__ = [
    "ITEM_LAYOUTS",
    "MODEL_INPUTS",
    "PAIR_LAYOUTS",
    "attention_bias",
    "batch_sequence_logps",
    "item_batch",
    "model_inputs",
    "pair_batch",
]
