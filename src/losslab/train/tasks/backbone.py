"""Loading a task's backbone: the ``from_pretrained`` arguments every task model shares, and
the pad id that decoder backbones need."""

from __future__ import annotations

from typing import Any

import torch

from losslab.train.config import TrainConfig


def model_kwargs(config: TrainConfig) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments shared by every task model."""
    return {"dtype": getattr(torch, config.dtype), "trust_remote_code": config.trust_remote_code}


def set_pad_token(model: torch.nn.Module, tokenizer: Any) -> None:
    """Decoder backbones read the score at the last non-padding token: they need the pad id."""
    config: Any = model.config
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
