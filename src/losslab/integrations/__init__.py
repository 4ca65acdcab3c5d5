"""losslab inside a trainer you already have: ``transformers.Trainer`` or TRL's ``SFTTrainer``
(:mod:`losslab.integrations.trainer`; docs/integrations.md).

``LosslabSFTTrainer`` (``losslab_trainer(trl.SFTTrainer)``) imports TRL when first looked up."""

from typing import Any

from losslab.integrations.trainer import (
    LosslabCollator,
    collator,
    loss_func,
    losslab_trainer,
    sft_dataset,
    sft_trainer_class,
)

# LosslabSFTTrainer is left out of __all__: `import *` must work without TRL (looking it up then
# raises a UserError naming the extra, which `from losslab.integrations import LosslabSFTTrainer` shows)
__all__ = ["LosslabCollator", "collator", "loss_func", "losslab_trainer", "sft_dataset"]


def __getattr__(name: str) -> Any:
    if name == "LosslabSFTTrainer":
        return sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
