"""losslab inside a trainer you already have: ``transformers.Trainer`` or TRL's ``SFTTrainer``
(:mod:`losslab.integrations.trainer`; docs/integrations.md)."""

from losslab.integrations.trainer import LosslabCollator, collator, loss_func, sft_dataset

__all__ = ["LosslabCollator", "collator", "loss_func", "sft_dataset"]
