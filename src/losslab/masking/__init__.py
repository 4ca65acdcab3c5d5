"""Loss masks: records -> token ids, labels and weights, under any chat template.

- :func:`build_samples` / :class:`MaskBuilder` (records to samples), :class:`MaskConfig`,
  :class:`BuildStats`;
- :class:`MaskPolicy` (all, assistant, last, completion), :class:`Strategy` (concat,
  expand, auto);
- :class:`PaddedCollator`, :class:`PackedCollator`, :func:`pack_greedy`;
- :class:`ChatTemplate` (rendering with content spans).

See docs/masking.md.
"""

from losslab.labels import IGNORE_INDEX
from losslab.masking.build import BuildStats, MaskBuilder, MaskConfig, MaskedSequence, build_samples
from losslab.masking.collate import PackedCollator, PaddedCollator, block_causal_mask, pack_greedy
from losslab.masking.policies import MaskPolicy
from losslab.masking.render import ChatTemplate
from losslab.masking.strategy import Strategy

__all__ = [
    "IGNORE_INDEX",
    "BuildStats",
    "ChatTemplate",
    "MaskBuilder",
    "MaskConfig",
    "MaskPolicy",
    "MaskedSequence",
    "PackedCollator",
    "PaddedCollator",
    "Strategy",
    "block_causal_mask",
    "build_samples",
    "pack_greedy",
]
