"""losslab's composite loss as a ``transformers.Trainer`` ``compute_loss_func``.

Usable with your own Trainer::

    loss = CausalLMLossFunc(build_composite([{"name": "token_cross_entropy", "label_smoothing": 0.1}]))
    trainer = Trainer(model=model, args=args, train_dataset=ds, compute_loss_func=loss,
                      callbacks=[LossTermsCallback(loss)])

The Trainer passes ``num_items_in_batch``: the number of trained next-token targets in the
whole accumulated batch, summed over processes. Each micro-batch's token loss is then
``sum / num_items_in_batch``, so accumulating 4 micro-batches equals one batch 4 times larger
and several processes equal one (the Trainer multiplies by the number of processes because
DDP averages gradients). The ``sequence`` reduction also needs the number of sequences with a
trained target in the whole step (:attr:`CausalLMLossFunc.num_sequences`), which
:class:`~losslab.train.trainer.LosslabTrainer` counts; a plain Trainer does not, and the
``sequence`` reduction then averages each micro-batch's sequences (exact only when every
micro-batch has as many).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from losslab.losses.composite import CompositeLoss, CompositeOutput, LossInputs


class TermAverager:
    """Every term's value between two log lines, exact under accumulation and several processes.

    Training: the composite's values are each micro-batch's share of its optimizer step
    (see ``CompositeLoss(per_batch_scale=...)``), so they are summed within a step (``group``),
    summed over processes, and averaged over the steps since the last log line.
    Evaluation (``group=None``): each batch is its own group, averaged over batches and processes.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.groups: set[Any] = set()
        self.calls = 0
        self.weights: dict[str, float] = {}

    def add(self, out: CompositeOutput, group: Any = None) -> None:
        self.calls += 1
        self.groups.add(group if group is not None else ("call", self.calls))
        for label, value in out.values.items():
            self.sums[label] = self.sums.get(label, 0.0) + float(value.detach())
        self.weights = dict(out.weights)

    def pop(self, prefix: str = "", *, shares: bool = True) -> dict[str, float]:
        """Means since the last pop as ``{prefix}loss/LABEL`` and ``{prefix}weight/LABEL``.
        Collective under ``torch.distributed``: call it on every process."""
        labels = sorted(self.sums)
        totals = [self.sums[k] for k in labels]
        groups = float(len(self.groups))
        if torch.distributed.is_available() and torch.distributed.is_initialized() and labels:
            t = torch.tensor([*totals, groups], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            totals = t[:-1].tolist()
            if not shares:  # evaluation: every process's batches are whole; average over all of them
                groups = float(t[-1])
        self.sums, self.groups, self.calls = {}, set(), 0
        if not groups:
            return {}
        logs = {f"{prefix}loss/{k}": v / groups for k, v in zip(labels, totals)}
        logs.update({f"{prefix}weight/{k}": w for k, w in self.weights.items()})
        return logs


class CausalLMLossFunc:
    """Next-token composite loss: ``(outputs, labels, num_items_in_batch) -> scalar``.

    ``labels`` (B, T) are unshifted (``-100`` = not trained); position t's prediction is scored
    against ``labels[:, t + 1]``. With ``fused=True`` the model must be called with
    ``output_hidden_states=True`` and no logits (``logits_to_keep`` an empty index tensor, which
    :class:`~losslab.train.trainer.LosslabTrainer` does), and ``lm_head`` gives the LM head weight:
    token cross-entropy then runs through the fused head without the N x V logits.
    ``hidden_states=True`` (terms on features, e.g. ``semantic_alignment``): the model is also
    called with ``output_hidden_states=True``; ``LossInputs.hidden_states`` are the last layer's,
    shifted like the logits (position t, which predicts token t + 1).
    Extra per-batch tensors (``token_weights`` (B, T), unshifted) are set by the trainer in
    :attr:`batch_extras` before each call.
    """

    shifts_labels = True  # labels are shifted here, whatever the model class (num_items_in_batch counts labels[..., 1:])

    def __init__(
        self,
        composite: CompositeLoss,
        *,
        fused: bool = False,
        lm_head: torch.nn.Module | None = None,
        model: torch.nn.Module | None = None,
        reference_params: dict[str, torch.Tensor] | None = None,
        hidden_states: bool = False,
    ) -> None:
        if fused and lm_head is None:
            raise ValueError("fused=True needs the model's LM head (model.get_output_embeddings())")
        self.composite = composite
        self.fused = fused
        self.hidden_states = fused or hidden_states  # ask the model for output_hidden_states
        self.lm_head = lm_head
        self.model = model
        self.reference_params = reference_params
        self.step = 0
        self.per_batch_scale = 1.0  # 1 / (accumulation steps x processes), set by LossTermsCallback
        self.num_sequences: Any = None  # sequences with a trained target in the optimizer step, set by LosslabTrainer
        self.batch_extras: dict[str, torch.Tensor] = {}
        self.train_terms = TermAverager()
        self.eval_terms = TermAverager()
        self.last: CompositeOutput | None = None

    def inputs(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None,
               num_sequences: Any = None) -> LossInputs:
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
            num_sequences=num_sequences,
            hidden_states=hidden,
            lm_head_weight=head.weight if (self.fused and head is not None) else None,
            lm_head_bias=getattr(head, "bias", None) if self.fused else None,
            attention_mask=attention[:, 1:] if attention is not None else None,
            model=self.model,
            reference_params=self.reference_params,
        )

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        training = self.model.training if self.model is not None else torch.is_grad_enabled()
        counted = training and num_items_in_batch is not None
        scale = self.per_batch_scale if counted else 1.0
        sequences = self.num_sequences if counted else None  # without it, `sequence` is a per-batch mean
        out = self.composite(self.inputs(outputs, labels, num_items_in_batch, sequences), self.step, scale)
        self.last = out
        if training:
            self.train_terms.add(out, group=self.step)
        else:
            self.eval_terms.add(out)
        return out.total


def lm_head_gives_logits(model: torch.nn.Module) -> bool:
    """Whether ``model``'s logits are its LM head applied to its last hidden state, which is what
    the fused head computes. False for models that soft-cap or scale their logits (Gemma-2's
    ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``): the fused
    head would train another loss than the model's. Checked on one short input in eval mode."""
    head = model.get_output_embeddings()
    if head is None:
        return False
    ids = torch.arange(1, 9, device=head.weight.device).remainder(head.weight.shape[0]).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
            logits, again = out.logits.float(), head(out.hidden_states[-1]).float()
    finally:
        model.train(was_training)
    if logits.shape != again.shape:
        return False
    scale = float(logits.abs().max().clamp(min=1.0))
    return bool(torch.allclose(again, logits, rtol=1e-3, atol=1e-3 * scale))

