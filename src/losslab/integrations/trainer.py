"""losslab's loss, masks and collators for a plain ``transformers.Trainer`` or TRL's ``SFTTrainer``.

- :func:`losslab_trainer` (recommended): any ``Trainer`` subclass with losslab's loss as its
  ``compute_loss`` (:class:`~losslab.train.trainer.LosslabLossMixin`, the loss part of ``losslab
  train``'s own trainer): the loss runs the model itself, so token weights reach it, the fused head
  asks the model for no logits and the ``sequence`` reduction counts the step's rows; no
  ``compute_loss_func`` (deprecated in TRL 1.16). ``LosslabSFTTrainer`` is
  ``losslab_trainer(SFTTrainer)``.
- :func:`loss_func`: any composite (``loss.terms`` of a config) as the Trainer's
  ``compute_loss_func(outputs, labels, num_items_in_batch=None)``: token terms are divided by the
  step's global ``num_items_in_batch`` (exact under accumulation and several processes); pass
  ``callbacks=[loss.callback()]`` so weight schedules advance, per-batch terms count once per
  optimizer step, and every term is logged.
- :func:`sft_dataset`: records -> ``datasets.Dataset`` of ``input_ids`` and ``labels`` under
  losslab's mask policies (for ``SFTTrainer``: ``dataset_kwargs={"skip_prepare_dataset": True}``).
- :func:`collator`: padded or packed batches of those samples, in the keys a model's forward takes
  (``weights=True``: also the token weights, for a :func:`losslab_trainer` class).

Limits of the ``compute_loss_func`` path (a ``compute_loss_func`` only sees the model's outputs
and the labels): per-token weights (``role_weights``, message ``weight``) cannot reach the loss,
so :func:`collator` (without ``weights=True``) refuses samples whose weights are not 0/1; the ``sequence`` reduction is a per-micro-batch mean (the Trainer does
not count the step's rows); terms that need more than logits and hidden states (a reference
model, a teacher) need ``losslab train``. The fused head (``fused=True``) gives the same loss from
the hidden states but the model still computes its logits, so it saves no memory there.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from losslab.data.builtin import BUILTIN_DATA_PREFIX, resolve_data_path
from losslab.errors import UserError
from losslab.labels import IGNORE_INDEX
from losslab.losses.composite import CompositeLoss
from losslab.losses.registry import build_composite
from losslab.masking import MaskConfig, PackedCollator, PaddedCollator, build_samples
from losslab.train.adapter import LossAdapter
from losslab.train.next_token import causal_lm_loss
from losslab.train.trainer import LosslabLossMixin, LossTermsCallback

DEFAULT_TERMS: tuple[Mapping[str, Any], ...] = ({"name": "token_cross_entropy"},)
TRL_MISSING = "LosslabSFTTrainer needs TRL: pip install 'losslab[trl]'"

TrainerT = TypeVar("TrainerT", bound=type)


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
    ``hidden_states``, also ``output_hidden_states=True`` (for ``loss_func(fused=True)``).
    ``weights``: also the token ``weights`` (B, T), for a :func:`losslab_trainer` class, whose loss
    reads them; without it, samples whose weights are not 0/1 are refused (a ``compute_loss_func``
    never sees them)."""

    def __init__(
        self, pad_token_id: int, *, packing: bool = False, hidden_states: bool = False, weights: bool = False
    ) -> None:
        self.inner = PackedCollator() if packing else PaddedCollator(pad_token_id)
        self.hidden_states = hidden_states
        self.weights = weights

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        samples = [{k: v for k, v in s.items() if k in ("input_ids", "labels", "weights")} for s in samples]
        if self.weights:
            if any("weights" not in s for s in samples):
                raise UserError(
                    "collator(weights=True) got a sample without token weights: build the dataset with "
                    "sft_dataset(..., weights=True), and keep the column (a losslab_trainer(...) class keeps it; "
                    "otherwise set remove_unused_columns=False)"
                )
            weighted = self.inner(samples)
            return {**weighted, "output_hidden_states": True} if self.hidden_states else weighted
        if any(_weighted(s) for s in samples):
            raise UserError(
                "a sample has token weights other than 0/1 (role_weights or a message weight): a "
                "compute_loss_func never sees them; use losslab_trainer(...) / LosslabSFTTrainer with "
                "collator(tokenizer, weights=True), or losslab train"
            )
        batch: dict[str, Any] = {k: v for k, v in self.inner(samples).items() if k != "weights"}
        if self.hidden_states:
            batch["output_hidden_states"] = True
        return batch


def collator(
    tokenizer: Any, *, packing: bool = False, hidden_states: bool = False, weights: bool = False
) -> LosslabCollator:
    """The collator for :func:`sft_dataset`'s samples (``tokenizer``: its ``pad_token_id`` pads);
    ``weights=True`` keeps the token weights (for a :func:`losslab_trainer` class)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LosslabCollator(pad, packing=packing, hidden_states=hidden_states, weights=weights)


def sft_dataset(
    data: str | Path | Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    mask: str | None = None,
    max_length: int | None = None,
    template: str | None = None,
    strategy: str = "auto",
    role_weights: Mapping[str, float] | None = None,
    weights: bool = False,
    limit: int | None = None,
) -> Any:
    """Chat or instruction records (a file, ``builtin:NAME`` or a list of records) -> a
    ``datasets.Dataset`` with ``input_ids`` and ``labels`` (losslab's mask policy ``mask``:
    assistant | last | completion | all; the same samples ``losslab train`` builds with these
    ``data:`` settings). Give it to ``SFTTrainer`` with
    ``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True})`` and :func:`collator`.

    ``weights``: also a ``weights`` column, the token weights (``role_weights``, e.g.
    ``{"assistant": 1.0, "tool": 0.5}``, times a message's own ``weight``), for a
    :func:`losslab_trainer` class with ``collator(tokenizer, weights=True)``. Without it, samples
    with a trained token's weight other than 1 are refused: a ``compute_loss_func`` never sees the
    weights (and the Trainer's ``remove_unused_columns`` would drop the column before the collator)."""
    from datasets import Dataset

    config = MaskConfig(
        mask=mask, strategy=strategy, template=template, max_length=max_length, role_weights=dict(role_weights or {})
    )
    if isinstance(data, str) and data.startswith(BUILTIN_DATA_PREFIX):
        data = resolve_data_path(data)
    samples = build_samples(data, tokenizer, config, limit=limit)
    if not weights and any(_weighted(s) for s in samples):
        raise UserError(
            "token weights other than 0/1 (role_weights or a message weight) need sft_dataset(..., weights=True), "
            "collator(tokenizer, weights=True) and a losslab_trainer(...) / LosslabSFTTrainer: a "
            "compute_loss_func never sees them"
        )
    keys = ("input_ids", "labels", "weights") if weights else ("input_ids", "labels")
    return Dataset.from_list([{k: s[k] for k in keys} for s in samples])


def _weighted(sample: Mapping[str, Any]) -> bool:
    """Whether a sample's token weights are other than its mask (1 trained, 0 not)."""
    weights = sample.get("weights")
    return weights is not None and any(
        w != (0.0 if label == IGNORE_INDEX else 1.0) for w, label in zip(weights, sample["labels"])
    )


@functools.cache
def losslab_trainer(base: TrainerT) -> TrainerT:
    """``base`` (``transformers.Trainer`` or any subclass: TRL's ``SFTTrainer``, yours) with losslab's
    loss as its ``compute_loss``: ``class Losslab<Base>(LosslabLossMixin, base)``.

    Its constructor takes ``losslab_loss=`` (a :func:`loss_func`, or any
    :class:`~losslab.train.adapter.LossAdapter`) besides ``base``'s arguments, adds the loss's
    callback (:class:`~losslab.train.trainer.LossTermsCallback`) unless given, and refuses
    ``compute_loss_func``. The loss runs the model on the batch itself: the batch's token
    ``weights`` (``collator(tokenizer, weights=True)``) reach it, the fused head asks the model for
    no logits, and the ``sequence`` reduction counts the step's rows over accumulation and
    processes, as in ``losslab train``. The ``weights`` column is kept by
    ``remove_unused_columns`` (:class:`~losslab.train.trainer.LosslabLossMixin`). ``base.compute_loss`` is not called (TRL's entropy and token-accuracy
    metrics are not logged; docs/integrations.md)."""

    class Losslab(LosslabLossMixin, base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, losslab_loss: LossAdapter, callbacks: list | None = None, **kwargs: Any) -> None:
            if kwargs.get("compute_loss_func") is not None:
                raise UserError(f"{type(self).__name__} computes losslab_loss itself: pass no compute_loss_func")
            callbacks = list(callbacks or [])
            if not any(isinstance(cb, LossTermsCallback) and cb.loss_func is losslab_loss for cb in callbacks):
                callbacks.append(LossTermsCallback(losslab_loss))
            super().__init__(*args, loss_func=losslab_loss, callbacks=callbacks, **kwargs)

    # (not LosslabTrainer for a plain Trainer: that is losslab train's, with StepGuard)
    name = "LosslabLossTrainer" if base.__name__ == "Trainer" else f"Losslab{base.__name__}"
    Losslab.__name__ = Losslab.__qualname__ = name
    Losslab.__doc__ = f"``{base.__module__}.{base.__qualname__}`` with losslab's loss (:func:`losslab_trainer`)."
    return Losslab  # type: ignore[return-value]


def sft_trainer_class() -> type:
    """``losslab_trainer(trl.SFTTrainer)`` (``losslab.integrations.LosslabSFTTrainer``); TRL is imported here."""
    try:
        from trl import SFTTrainer
    except ImportError as exc:
        raise UserError(TRL_MISSING) from exc
    return losslab_trainer(SFTTrainer)
