"""losslab's composite loss as a ``transformers.Trainer`` ``compute_loss_func``.

Usable with your own Trainer::

    loss = CausalLMLossFunc(build_composite([{"name": "token_cross_entropy", "label_smoothing": 0.1}]))
    trainer = Trainer(model=model, args=args, train_dataset=ds, compute_loss_func=loss,
                      callbacks=[LossTermsCallback(loss)])

The Trainer passes ``num_items_in_batch``: the number of trained next-token targets in the
whole accumulated batch, summed over processes. Each micro-batch's token loss is then
``sum / num_items_in_batch``, so accumulating 4 micro-batches equals one batch 4 times larger
and several processes equal one (the Trainer multiplies by the number of processes because
DDP averages gradients).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from losslab.losses.composite import CompositeLoss, CompositeOutput, LossInputs


class TermAverager:
    """Running sums of every term's value between two log lines (exact means per log line)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.weights: dict[str, float] = {}
        self.non_finite = 0

    def add(self, out: CompositeOutput) -> None:
        self.count += 1
        for label, value in out.values.items():
            v = float(value.detach())
            if not math.isfinite(v):
                self.non_finite += 1
            self.sums[label] = self.sums.get(label, 0.0) + v
        self.weights = dict(out.weights)

    def pop(self, prefix: str = "") -> dict[str, float]:
        """Means since the last pop as ``{prefix}loss/LABEL`` and ``{prefix}weight/LABEL``."""
        if not self.count:
            return {}
        logs = {f"{prefix}loss/{k}": v / self.count for k, v in self.sums.items()}
        logs.update({f"{prefix}weight/{k}": w for k, w in self.weights.items()})
        self.sums, self.count = {}, 0
        return logs


class CausalLMLossFunc:
    """Next-token composite loss: ``(outputs, labels, num_items_in_batch) -> scalar``.

    ``labels`` (B, T) are unshifted (``-100`` = not trained); position t's prediction is scored
    against ``labels[:, t + 1]``. With ``fused=True`` the model must be called with
    ``output_hidden_states=True`` and no logits (``logits_to_keep`` an empty index tensor, which
    :class:`~losslab.train.trainer.LosslabTrainer` does), and ``lm_head`` gives the LM head weight:
    token cross-entropy then runs through the fused head without the N x V logits.
    Extra per-batch tensors (``token_weights`` (B, T), unshifted) are set by the trainer in
    :attr:`batch_extras` before each call.
    """

    def __init__(
        self,
        composite: CompositeLoss,
        *,
        fused: bool = False,
        lm_head: torch.nn.Module | None = None,
        model: torch.nn.Module | None = None,
        reference_params: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if fused and lm_head is None:
            raise ValueError("fused=True needs the model's LM head (model.get_output_embeddings())")
        self.composite = composite
        self.fused = fused
        self.lm_head = lm_head
        self.model = model
        self.reference_params = reference_params
        self.step = 0
        self.batch_extras: dict[str, torch.Tensor] = {}
        self.train_terms = TermAverager()
        self.eval_terms = TermAverager()
        self.last: CompositeOutput | None = None

    def inputs(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> LossInputs:
        """Build the shifted :class:`LossInputs` of one batch."""
        shift_labels = labels[:, 1:]
        extras = self.batch_extras
        weights = extras.get("token_weights")
        attention = extras.get("attention_mask")
        hidden_all = outputs.get("hidden_states") if isinstance(outputs, dict) else getattr(outputs, "hidden_states", None)
        hidden = hidden_all[-1][:, :-1] if hidden_all is not None else None
        logits = None if self.fused else outputs["logits"][:, :-1]
        head = self.lm_head
        return LossInputs(
            logits=logits,
            labels=shift_labels,
            token_weights=weights[:, 1:] if weights is not None else None,
            num_items=num_items_in_batch,
            hidden_states=hidden,
            lm_head_weight=head.weight if (self.fused and head is not None) else None,
            lm_head_bias=getattr(head, "bias", None) if self.fused else None,
            attention_mask=attention[:, 1:] if attention is not None else None,
            model=self.model,
            reference_params=self.reference_params,
        )

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        out = self.composite(self.inputs(outputs, labels, num_items_in_batch), self.step)
        self.last = out
        training = self.model.training if self.model is not None else torch.is_grad_enabled()
        (self.train_terms if training else self.eval_terms).add(out)
        return out.total
