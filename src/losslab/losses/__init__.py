"""Loss catalogue: pure functions on tensors, their reductions, composition and schedules."""

from losslab.losses.common import TeacherTopK
from losslab.losses.composite import CompositeLoss, CompositeOutput, LossInputs, LossTerm
from losslab.losses.dialogue import consistency_loss, semantic_alignment_loss, semantic_l2_loss
from losslab.losses.distillation import DIVERGENCES, distillation_loss
from losslab.losses.fused import fused_linear_cross_entropy  # noqa: F401  (fused loss head)
from losslab.losses.fused_distillation import fused_linear_distillation
from losslab.losses.logprobs import fused_sequence_logps, sequence_logps
from losslab.losses.pairwise import bradley_terry_loss, info_nce_loss, margin_ranking_loss, triplet_loss
from losslab.losses.preference import kto_loss, preference_loss
from losslab.losses.reduction import reduce_loss
from losslab.losses.registry import LOSSES, build_composite, build_term
from losslab.losses.regularizers import l2_penalty, l2_sp_penalty, select_parameters, snapshot_parameters
from losslab.losses.schedules import SCHEDULES, build_schedule, build_weight
from losslab.losses.sequence import (
    binary_cross_entropy,
    binary_focal_loss,
    classification_cross_entropy,
    focal_loss,
    huber_loss,
    mse_loss,
    multiclass_hinge_loss,
)
from losslab.losses.token import sequence_mean, token_cross_entropy

__all__ = ["reduce_loss", "sequence_mean", "token_cross_entropy"]
__all__ += [
    "DIVERGENCES",
    "LOSSES",
    "SCHEDULES",
    "CompositeLoss",
    "CompositeOutput",
    "LossInputs",
    "LossTerm",
    "TeacherTopK",
    "binary_cross_entropy",
    "binary_focal_loss",
    "bradley_terry_loss",
    "build_composite",
    "build_schedule",
    "build_term",
    "build_weight",
    "classification_cross_entropy",
    "consistency_loss",
    "distillation_loss",
    "focal_loss",
    "fused_linear_distillation",
    "fused_sequence_logps",
    "huber_loss",
    "info_nce_loss",
    "kto_loss",
    "l2_penalty",
    "l2_sp_penalty",
    "margin_ranking_loss",
    "mse_loss",
    "multiclass_hinge_loss",
    "preference_loss",
    "select_parameters",
    "semantic_alignment_loss",
    "semantic_l2_loss",
    "sequence_logps",
    "snapshot_parameters",
    "triplet_loss",
]
