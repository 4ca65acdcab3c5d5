"""losslab's loss, masks and collators for a plain ``transformers.Trainer`` or TRL's ``SFTTrainer``.

- :func:`loss_func`: any composite (``loss.terms`` of a config) as the Trainer's
  ``compute_loss_func(outputs, labels, num_items_in_batch=None)``: token terms are divided by the
  step's global ``num_items_in_batch`` (exact under accumulation and several processes); pass
  ``callbacks=[loss.callback()]`` so weight schedules advance, per-batch terms count once per
  optimizer step, and every term is logged.
- :func:`sft_dataset`: records -> ``datasets.Dataset`` of ``input_ids`` and ``labels`` under
  losslab's mask policies (for ``SFTTrainer``: ``dataset_kwargs={"skip_prepare_dataset": True}``).
- :func:`collator`: padded or packed batches of those samples, in the keys a model's forward takes.

Limits (a ``compute_loss_func`` only sees the model's outputs and the labels): per-token weights
(``role_weights``, message ``weight``) cannot reach the loss, so :func:`collator` refuses samples
whose weights are not 0/1; the ``sequence`` reduction is a per-micro-batch mean (the Trainer does
not count the step's rows); terms that need more than logits and hidden states (a reference
model, a teacher) need ``losslab train``. The fused head (``fused=True``) gives the same loss from
the hidden states but the model still computes its logits, so it saves no memory there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from losslab.data.builtin import BUILTIN_DATA_PREFIX, resolve_data_path
from losslab.errors import UserError
from losslab.labels import IGNORE_INDEX
from losslab.losses.composite import CompositeLoss
from losslab.losses.registry import build_composite
from losslab.masking import MaskConfig, PackedCollator, PaddedCollator, build_samples
from losslab.train.adapter import LossAdapter
from losslab.train.next_token import causal_lm_loss
from losslab.train.trainer import LossTermsCallback

DEFAULT_TERMS: tuple[Mapping[str, Any], ...] = ({"name": "token_cross_entropy"},)


class TrainerLoss(LossAdapter):
    """A :class:`LossAdapter` for ``compute_loss_func``, with :meth:`callback`."""

    def callback(self) -> LossTermsCallback:
        """The Trainer callback that advances schedules, scales per-batch terms and logs each term."""
        return LossTermsCallback(self)


def loss_func(
    terms: Sequence[Mapping[str, Any]] | CompositeLoss | None = None,
    *,
    model: torch.nn.Module | None = None,
    fused: bool = False,
    total_steps: int | None = None,
) -> TrainerLoss:
    """losslab's next-token loss as a ``compute_loss_func(outputs, labels, num_items_in_batch=None)``.

    ``terms``: the ``loss.terms`` list of a config (default: token cross-entropy) or a built
    :class:`CompositeLoss`; ``total_steps``: the run's length, for weight schedules that leave it
    out. ``model``: the model being trained (needed by ``fused`` and by ``l2``/``l2_sp`` terms).
    ``fused``: compute token terms from the last hidden states and the LM head (the model must
    return hidden states: use :func:`collator` with ``hidden_states=True``). Labels are unshifted
    (``-100`` = not trained), as every Hugging Face collator gives them; the loss shifts.
    """
    composite = (
        terms if isinstance(terms, CompositeLoss) else build_composite(terms or DEFAULT_TERMS, total_steps=total_steps)
    )
    base = causal_lm_loss(composite, model=model, fused=fused, hidden_states=fused)  # type: ignore[arg-type]
    out = TrainerLoss(base.composite, base.forward, model=model, shifts_labels=True, from_outputs=base.from_outputs)
    return out


class LosslabCollator:
    """Padded (or packed) batches of losslab samples with only the keys a model's forward takes:
    ``input_ids``, ``attention_mask`` (padded) or ``position_ids`` (packed), ``labels``; with
    ``hidden_states``, also ``output_hidden_states=True`` (for ``loss_func(fused=True)``)."""

    def __init__(self, pad_token_id: int, *, packing: bool = False, hidden_states: bool = False) -> None:
        self.inner = PackedCollator() if packing else PaddedCollator(pad_token_id)
        self.hidden_states = hidden_states

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        samples = [{k: v for k, v in s.items() if k in ("input_ids", "labels", "weights")} for s in samples]
        for s in samples:
            weights = s.get("weights")
            if weights is not None and any(
                w != (0.0 if label == IGNORE_INDEX else 1.0) for w, label in zip(weights, s["labels"])
            ):
                raise UserError(
                    "a sample has token weights other than 0/1 (role_weights or a message weight): a "
                    "compute_loss_func never sees them; train with losslab train (or LosslabTrainer)"
                )
        batch = {k: v for k, v in self.inner(samples).items() if k != "weights"}
        if self.hidden_states:
            batch["output_hidden_states"] = True
        return batch


def collator(tokenizer: Any, *, packing: bool = False, hidden_states: bool = False) -> LosslabCollator:
    """The collator for :func:`sft_dataset`'s samples (``tokenizer``: its ``pad_token_id`` pads)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LosslabCollator(pad, packing=packing, hidden_states=hidden_states)


def sft_dataset(
    data: str | Path | Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    mask: str | None = None,
    max_length: int | None = None,
    template: str | None = None,
    strategy: str = "auto",
    limit: int | None = None,
) -> Any:
    """Chat or instruction records (a file, ``builtin:NAME`` or a list of records) -> a ``datasets.Dataset`` with ``input_ids`` and ``labels`` (losslab's
    mask policy ``mask``: assistant | last | completion | all; the same samples ``losslab train``
    builds with these ``data:`` settings). Give it to ``SFTTrainer`` with
    ``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True})`` and :func:`collator`."""
    from datasets import Dataset

    config = MaskConfig(mask=mask, strategy=strategy, template=template, max_length=max_length)
    if isinstance(data, str) and data.startswith(BUILTIN_DATA_PREFIX):
        data = resolve_data_path(data)
    samples = build_samples(data, tokenizer, config, limit=limit)
    return Dataset.from_list([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples])
