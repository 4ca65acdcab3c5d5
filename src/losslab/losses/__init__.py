"""Loss catalogue: pure functions on tensors, their reductions, composition and schedules."""

from losslab.losses.reduction import reduce_loss
from losslab.losses.token import sequence_mean, token_cross_entropy

__all__ = ["reduce_loss", "sequence_mean", "token_cross_entropy"]
