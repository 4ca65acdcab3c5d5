"""The ``preference`` task's batches and forward: the collator that lays features out in the pair
rows of ``preference.layout`` (:mod:`losslab.train.tasks.pair_rows`), and
:class:`PreferenceForward`, ``(model, batch) -> LossInputs`` with the step's monitor values.

One forward per batch asks for the last hidden states, no logits: the states of the scored
positions go through :func:`~losslab.losses.fused_sequence_logps`. This module's code computes
the reference log-probs too (on the fly, or once for the cache: it is named in the cache's
fingerprint, :func:`losslab.train.tasks.preference_reference.cache_reference`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from losslab.errors import UserError
from losslab.losses.composite import LossInputs
from losslab.losses.logprobs import fused_sequence_logps

PAIRED = frozenset({"chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths", "num_sequences"})
PAIRED_REFERENCE = frozenset({"ref_chosen_logps", "ref_rejected_logps"})
UNPAIRED = frozenset({"policy_logps", "desirable", "num_sequences"})
UNPAIRED_REFERENCE = frozenset({"ref_logps", "kl_baseline"})
CROSS_ENTROPY = frozenset({"labels", "hidden_states", "lm_head_weight", "num_items"})
"""The chosen replies' next-token inputs (paired batches only): a token_cross_entropy term's."""
MONITOR = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected")
"""What every step logs besides the loss terms (``eval_`` prefixed in evaluation)."""


def row_items(features: list[dict[str, Any]], unpaired: bool) -> list[dict[str, list[int]]]:
    """The pair layout's items: a paired feature's prompt, chosen and rejected ids; an unpaired
    one's prompt, completion (as ``chosen``) and the KL estimate's mismatched reply (``rejected``)."""
    if unpaired:
        return [{"prompt": f["prompt"], "chosen": f["completion"], "rejected": f["kl_completion"]} for f in features]
    return [{"prompt": f["prompt"], "chosen": f["chosen"], "rejected": f["rejected"]} for f in features]


@dataclass
class PreferenceCollator:
    """A batch of features: the pair layout's rows (model inputs, ``score_positions``,
    ``targets``, ``segments``, ``labels``), plus ``margins``, ``desirable`` and the cached
    reference columns when the features carry them."""

    pad_id: int
    layout: str
    unpaired: bool
    reference_columns: tuple[str, ...] = ()
    mask_dtype: torch.dtype = torch.float32

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        from losslab.train.tasks.pair_rows import pair_batch

        items = row_items(features, self.unpaired)
        batch = pair_batch(items, layout=self.layout, pad_id=self.pad_id, mask_dtype=self.mask_dtype)
        if self.unpaired:
            batch["desirable"] = torch.tensor([bool(f["desirable"]) for f in features])
        elif any("margin" in f for f in features):
            batch["margins"] = torch.tensor([float(f.get("margin", 0.0)) for f in features])
        for column in self.reference_columns:
            if all(column in f for f in features):
                batch[column] = torch.tensor([float(f[column]) for f in features], dtype=torch.float32)
        return batch


def sequence_sums(
    model: torch.nn.Module, head: torch.nn.Module, batch: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward on the batch's rows (a :mod:`~losslab.train.tasks.pair_rows` batch):
    ``(sums, counts)`` (S,) of the completions' log-probs through the fused head (pairs: first
    B chosen / completion, last B rejected / mismatched reply), and the last hidden states (R, T, D)."""
    ids = batch["input_ids"]
    from losslab.train.tasks.pair_rows import model_inputs

    # the 4D mask in the form the model's attention takes (read off the model a wrapper holds)
    inputs = model_inputs(batch, cast(torch.nn.Module, getattr(model, "module", model)))
    out = model(**inputs, output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long, device=ids.device))
    hidden = out.hidden_states[-1]  # (R, T, D)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (R * T, D)
    scored = flat.index_select(0, batch["score_positions"])  # (M, D)
    sums, counts = fused_sequence_logps(
        scored,
        cast(torch.Tensor, head.weight),
        batch["targets"],
        batch["segments"],
        int(batch["num_segments"]),
        bias=getattr(head, "bias", None),
    )
    return sums, counts, hidden


def batch_pairs(batch: dict[str, Any]) -> int:
    """B: the pairs (or unpaired items) of a collated batch."""
    return int(batch["num_segments"]) // 2


def distributed_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over processes (itself in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return value


@dataclass
class PreferenceForward:
    """The task's forward: ``(model, batch) -> LossInputs`` (see the module docstring).

    ``reference``: the frozen reference model run on the same rows each step (``model`` mode),
    or None (cached columns in the batch, or no reference). ``beta``: the monitor's reward scale.
    """

    head: torch.nn.Module
    unpaired: bool
    reference: torch.nn.Module | None = None
    beta: float = 0.1
    reference_free: bool = False
    nll: bool = True

    def reference_sums(self, batch: dict[str, Any]) -> torch.Tensor:
        """The reference's (2B,) log-prob sums on the batch's rows (no gradient)."""
        assert self.reference is not None
        device = batch["input_ids"].device
        if next(self.reference.parameters()).device != device:
            self.reference.to(device)
        with torch.no_grad():
            head = output_embeddings(self.reference)
            return sequence_sums(self.reference, head, batch)[0]

    def reference_columns(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The reference's per-item values of a batch (what the cache stores)."""
        b = batch_pairs(batch)
        sums = self.reference_sums(batch)
        if self.unpaired:
            return {"ref_logps": sums[:b], "ref_kl_logps": sums[b:]}
        return {"ref_chosen_logps": sums[:b], "ref_rejected_logps": sums[b:]}

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossInputs:
        b = batch_pairs(batch)
        sums, counts, hidden = sequence_sums(model, self.head, batch)
        refs = self.reference_columns(batch) if self.reference is not None else {}
        refs.update(
            {k: batch[k] for k in ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps") if k in batch}
        )
        refs = {k: v.to(sums.dtype) for k, v in refs.items()}
        if self.unpaired:
            return self.unpaired_inputs(batch, sums, counts, refs, b)
        chosen, rejected = sums[:b], sums[b:]
        inputs = LossInputs(
            chosen_logps=chosen,
            rejected_logps=rejected,
            chosen_lengths=counts[:b],
            rejected_lengths=counts[b:],
            ref_chosen_logps=refs.get("ref_chosen_logps"),
            ref_rejected_logps=refs.get("ref_rejected_logps"),
            margins=batch.get("margins"),
        )
        if self.nll:
            weight = cast(torch.Tensor, self.head.weight)
            inputs.labels = batch["labels"][:, 1:]
            inputs.hidden_states = hidden[:, :-1]
            inputs.lm_head_weight = weight
            inputs.lm_head_bias = getattr(self.head, "bias", None)
        inputs.monitor = self.monitor(
            chosen, rejected, counts[:b], counts[b:], refs.get("ref_chosen_logps"), refs.get("ref_rejected_logps")
        )
        return inputs

    def rewards(self, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        """beta x (policy - reference) log-probs; without a reference, the length-normalised log-probs."""
        logps = logps.detach()
        if ref is None or self.reference_free:
            return logps / lengths.clamp(min=1)
        return self.beta * (logps - ref)

    def monitor(
        self,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
        ref_chosen: torch.Tensor | None,
        ref_rejected: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        rc = self.rewards(chosen, chosen_lengths, ref_chosen)
        rr = self.rewards(rejected, rejected_lengths, ref_rejected)
        return {
            "rewards/chosen": rc.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracy": (rc > rr).float().mean(),
            "rewards/margin": (rc - rr).mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }

    def unpaired_inputs(
        self,
        batch: dict[str, Any],
        sums: torch.Tensor,
        counts: torch.Tensor,
        refs: dict[str, torch.Tensor],
        b: int,
    ) -> LossInputs:
        policy, policy_kl = sums[:b], sums[b:].detach()
        desirable = batch["desirable"].to(torch.bool)
        ref, ref_kl = refs.get("ref_logps"), refs.get("ref_kl_logps")
        kl = None
        if ref_kl is not None:
            # KTO's baseline: KL(policy || reference) estimated on mismatched (prompt, reply) pairs,
            # the mean over the batch (and processes during training), clamped at 0, as TRL does
            kl = (policy_kl - ref_kl).mean()
            if torch.is_grad_enabled():
                kl = distributed_mean(kl)
            kl = kl.clamp(min=0).detach()
        inputs = LossInputs(policy_logps=policy, ref_logps=ref, desirable=desirable, kl_baseline=kl)
        rewards = self.rewards(policy, counts[:b], ref)
        nan = torch.tensor(float("nan"), device=policy.device)
        rc = rewards[desirable].mean() if desirable.any() else nan
        rr = rewards[~desirable].mean() if (~desirable).any() else nan
        lc = policy.detach()[desirable].mean() if desirable.any() else nan
        lr = policy.detach()[~desirable].mean() if (~desirable).any() else nan
        correct = torch.where(desirable, rewards > 0, rewards < 0).float().mean()
        inputs.monitor = {
            "rewards/chosen": rc,
            "rewards/rejected": rr,
            "rewards/accuracy": correct,
            "rewards/margin": rc - rr,
            "logps/chosen": lc,
            "logps/rejected": lr,
        }
        if kl is not None:
            inputs.monitor["kl"] = kl
        return inputs


def output_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """A causal LM's LM head (``get_output_embeddings()``)."""
    head = cast(Any, model).get_output_embeddings()
    if head is None:
        raise UserError("the preference task needs a causal LM with an output embedding (LM head)", where="model")
    return cast(torch.nn.Module, head)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def collated_on(collator: Callable[[list[dict]], dict[str, Any]], features: list[dict], device: torch.device) -> dict:
    batch = collator(features)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
