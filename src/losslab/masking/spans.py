"""From character regions of a rendered text to per-token labels and weights.

The full text is tokenised once (fast tokenizer, ``return_offsets_mapping``), so the tokens
trained are exactly the tokens the model sees. A token is trained when ANY of its characters
lies in a trained region (it then takes that region's weight):

- a token that starts in the header and runs into the content is trained: the model has to
  produce the content's first characters, and a loss mask acts on whole tokens. Mistral
  renders ``[/INST] `` + reply, and the reply's first token is `` Hello``, space included;
  a "first character" rule would never train the first word of any reply;
- a token that starts in a trained region and runs past its end is trained whole.

With the real tokenizer of a template family the end-of-turn and header markers are
special tokens, so nothing of the next header is ever trained; ``losslab inspect`` shows
where a boundary falls inside a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from losslab.labels import IGNORE_INDEX


@dataclass(frozen=True)
class Region:
    """Characters ``text[start:end]`` whose tokens get ``weight`` (0: not trained).

    ``message`` is the index of the message the region belongs to (-1: none).
    """

    start: int
    end: int
    weight: float
    message: int = -1


def label_tokens(
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    regions: Sequence[Region],
    *,
    default_weight: float = 0.0,
) -> tuple[list[int], list[float]]:
    """``(labels, weights)`` for tokens with character ``offsets``.

    ``labels[i] == input_ids[i]`` where the weight is > 0, else -100; ``weights[i]`` is the
    weight of the (last) region that token i overlaps (``default_weight`` if none). A
    zero-width token ``(p, p)`` stands for the character before ``p``: a ByteLevel
    post-processor with ``trim_offsets`` gives a whitespace token that ends at ``p`` such
    offsets, and it is trained with the text around it; at ``p == 0`` (a special token a
    post-processor adds) it is never trained. Regions must not overlap each other.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    # (T, 2); fromiter over the flat pairs is several times faster than asarray on a list of tuples
    offs = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)
    ends = offs[:, 1]
    zero_width = ends <= offs[:, 0]
    starts = np.where(zero_width, ends - 1, offs[:, 0])
    weights = np.full(len(ids), float(default_weight), dtype=np.float64)
    ordered = sorted((r for r in regions if r.end > r.start), key=lambda r: r.start)
    if ordered:
        r_start = np.array([r.start for r in ordered], dtype=np.int64)
        r_end = np.array([r.end for r in ordered], dtype=np.int64)
        r_weight = np.array([r.weight for r in ordered], dtype=np.float64)
        if np.any(r_start[1:] < r_end[:-1]):
            raise ValueError(f"overlapping regions: {ordered}")
        # the last region starting before the token's end; with sorted disjoint regions the
        # token overlaps some region iff it overlaps this one
        k = np.searchsorted(r_start, ends, side="left") - 1
        inside = (k >= 0) & (r_end[np.maximum(k, 0)] > starts)
        weights[inside] = r_weight[k[inside]]
    weights[zero_width & (ends <= 0)] = 0.0  # added by a post-processor
    labels = np.where(weights > 0, ids, IGNORE_INDEX)
    weights[labels == IGNORE_INDEX] = 0.0
    return labels.tolist(), weights.tolist()
