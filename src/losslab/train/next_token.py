"""A causal LM's loss inputs: next-token labels, the fused head's inputs, and the check that the
model's logits are its LM head applied to the last hidden state.

:func:`causal_lm_loss` is losslab's loss for a plain ``transformers.Trainer`` (docs/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from losslab.losses.composite import CompositeLoss, LossInputs
from losslab.train.adapter import LossAdapter

FUSED_FIELDS = frozenset(
    {
        "labels",
        "hidden_states",
        "lm_head_weight",
        "num_items",
        "token_weights",
        "attention_mask",
        "model",
        "reference_params",
    }
)
"""What a causal LM batch gives the loss when the fused head is on (no logits)."""
LOGIT_FIELDS = frozenset(
    {"labels", "logits", "num_items", "token_weights", "attention_mask", "model", "reference_params"}
)
"""What it gives when the logits are computed."""


@dataclass
class NextTokenForward:
    """The causal LM forward: ``(model, batch) -> LossInputs`` scored against the next token.

    ``batch``: ``input_ids``, ``labels`` (B, T) unshifted (``-100`` = not trained; position t's
    prediction is scored against ``labels[:, t + 1]``), optional ``weights`` (B, T) token weights,
    ``attention_mask`` and whatever else the model takes (packed rows' ``position_ids``).
    ``fused``: the model is asked for hidden states and no logits (``logits_to_keep`` an empty
    index tensor); the LM head's weight goes to the fused head. ``hidden_states``: terms on
    features (``semantic_alignment``) get the last layer's states, shifted like the logits.
    """

    lm_head: torch.nn.Module | None = None
    fused: bool = False
    hidden_states: bool = False

    def __post_init__(self) -> None:
        if self.fused and self.lm_head is None:
            raise ValueError("fused=True needs the model's LM head (model.get_output_embeddings())")

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossInputs:
        inputs = dict(batch)
        labels = inputs.pop("labels")
        weights = inputs.pop("weights", None)
        if self.fused:
            ids = inputs.get("input_ids")
            device = ids.device if ids is not None else None
            inputs.update(output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long, device=device))
        elif self.hidden_states:
            inputs["output_hidden_states"] = True
        if model.training and getattr(getattr(model, "config", None), "use_cache", False):
            inputs.setdefault("use_cache", False)  # a training forward keeps no KV cache (memory it never reads)
        return self.from_outputs(
            model(**inputs), labels, token_weights=weights, attention_mask=batch.get("attention_mask")
        )

    def from_outputs(
        self,
        outputs: Any,
        labels: torch.Tensor,
        *,
        token_weights: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> LossInputs:
        """The shifted :class:`LossInputs` of one batch from the model's outputs."""
        hidden_all = (
            outputs.get("hidden_states") if isinstance(outputs, dict) else getattr(outputs, "hidden_states", None)
        )
        head = self.lm_head if self.fused else None
        weight: torch.Tensor | None = head.weight if head is not None else None  # type: ignore[assignment]
        bias: torch.Tensor | None = getattr(head, "bias", None) if head is not None else None
        return LossInputs(
            logits=None if self.fused else outputs["logits"][:, :-1],
            labels=labels[:, 1:],
            token_weights=token_weights[:, 1:] if token_weights is not None else None,
            hidden_states=hidden_all[-1][:, :-1] if hidden_all is not None else None,
            lm_head_weight=weight,
            lm_head_bias=bias,
            attention_mask=attention_mask[:, 1:] if attention_mask is not None else None,
        )


def causal_lm_loss(
    composite: CompositeLoss, *, model: PreTrainedModel | None = None, fused: bool = False, hidden_states: bool = False
) -> LossAdapter:
    """losslab's next-token loss as a :class:`LossAdapter`: a ``compute_loss_func`` for a plain
    ``Trainer`` (with :class:`~losslab.train.trainer.LossTermsCallback`), or the loss of
    :class:`~losslab.train.trainer.LosslabTrainer` (which also feeds token weights and the
    fused head). ``fused`` needs ``model`` (its LM head)."""
    head = model.get_output_embeddings() if model is not None else None
    forward = NextTokenForward(lm_head=head if fused else None, fused=fused, hidden_states=fused or hidden_states)
    return LossAdapter(composite, forward, model=model, shifts_labels=True, from_outputs=forward.from_outputs)


def lm_head_gives_logits(model: PreTrainedModel) -> bool:
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


def checked_head(model: PreTrainedModel) -> bool:
    """:func:`lm_head_gives_logits`, or True with a printed note when the model cannot run the
    check outside the training engine (e.g. parameters partitioned by DeepSpeed ZeRO-3)."""
    try:
        return lm_head_gives_logits(model)
    except Exception as exc:  # noqa: BLE001  (any failure of a foreign model's forward: the check is advisory)
        print(
            f"fused loss head: could not compare the model's logits with its LM head ({type(exc).__name__}: {exc}); "
            "set loss.fused: false if the model caps or scales its logits (Gemma-2, Cohere, Granite)"
        )
        return True
