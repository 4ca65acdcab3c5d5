"""The ``preference`` task's reference model (``preference.reference``): the mode resolved
from the loss plan, the frozen reference loaded, and the cached reference log-probs added to
every feature (computed once, stored under ``$LOSSLAB_CACHE/reference``).
"""

from __future__ import annotations

from typing import Any

import torch

from losslab.train.config import TrainConfig
from losslab.train.task import LossPlan
from losslab.train.tasks.preference_forward import (
    PAIRED_REFERENCE,
    UNPAIRED_REFERENCE,
    PreferenceCollator,
    PreferenceForward,
    collated_on,
    device_of,
    output_embeddings,
)

REFERENCE_FIELDS = PAIRED_REFERENCE | UNPAIRED_REFERENCE
FINGERPRINT_CODE = (
    "losslab.train.tasks.preference_forward",
    "losslab.train.tasks.preference_reference",
    "losslab.train.tasks.pair_rows",
    "losslab.losses.logprobs",
)
"""The modules whose code computes the cached reference log-probs (the collator and forward, the
cache's batching, the pair rows, the fused log-probs): a change to one recomputes the cache."""


def resolved_reference(config: TrainConfig, plan: LossPlan) -> str:
    """model | cache | none: ``preference.reference``, with ``auto`` read off the plan."""
    if config.preference.reference != "auto":
        return config.preference.reference
    return "cache" if plan.needs.provides & REFERENCE_FIELDS else "none"


def reference_columns(unpaired: bool) -> tuple[str, str]:
    return ("ref_logps", "ref_kl_logps") if unpaired else ("ref_chosen_logps", "ref_rejected_logps")


def reference_name(config: TrainConfig) -> str:
    return config.preference.reference_model or config.model


def load_reference(config: TrainConfig, *, like: torch.nn.Module | None = None) -> torch.nn.Module:
    """The frozen reference: ``preference.reference_model`` loaded, else a copy of ``like`` (the
    policy before training) or ``config.model`` loaded afresh. Under LoRA (``like`` a PEFT model)
    the reference is ``like`` itself with its adapters disabled: the base model, no second copy."""
    from losslab.train.lora import AdaptersDisabled, is_peft
    from losslab.train.reference import frozen_reference

    if config.preference.reference_model is None and like is not None:
        if is_peft(like):
            return AdaptersDisabled(like)
        return frozen_reference(like=like)
    return frozen_reference(reference_name(config), dtype=config.dtype, trust_remote_code=config.trust_remote_code)


def cache_reference(
    config: TrainConfig, datasets: dict[str, list[dict]], collator: PreferenceCollator, unpaired: bool
) -> None:
    """Adds the reference's columns to every feature, from the cache or computed once (the
    reference model loaded only when something is missing)."""
    from losslab.train.reference import cached_logps, reference_fingerprint

    columns = reference_columns(unpaired)
    fields = ("prompt", "completion", "kl_completion") if unpaired else ("prompt", "chosen", "rejected")
    loaded: dict[str, PreferenceForward] = {}

    def compute(items: list[Any]) -> torch.Tensor:
        if "forward" not in loaded:
            reference = load_reference(config)
            if torch.cuda.is_available():
                reference.to("cuda")
            head = output_embeddings(reference)
            loaded["forward"] = PreferenceForward(head=head, unpaired=unpaired, reference=reference)
        forward = loaded["forward"]
        assert forward.reference is not None
        batch = collated_on(collator, list(items), device_of(forward.reference))
        values = forward.reference_columns(batch)
        return torch.stack([values[c] for c in columns], dim=1)

    batch_size = config.training.eval_batch_size or config.training.batch_size
    for split, features in datasets.items():
        fingerprint = reference_fingerprint(
            reference_name(config),
            features,
            fields=fields,
            extra={"dtype": config.dtype, "layout": config.preference.layout, "columns": list(columns)},
            code=list(FINGERPRINT_CODE),
        )
        values = cached_logps(features, compute, fingerprint=fingerprint, batch_size=batch_size, columns=columns)
        for feature, row in zip(features, values.tolist()):
            feature.update(zip(columns, row))
        print(f"reference log-probs ({split}): {len(features)} items, cache entry {fingerprint}")
