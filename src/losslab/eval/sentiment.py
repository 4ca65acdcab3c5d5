"""A sentiment reward for generated text: VADER's compound score (Hutto and Gilbert, 2014).

The ``preference`` task's evaluation scores sampled replies with it (the DPO paper's controlled
sentiment generation: make the text positive while staying close to the reference model).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any


@functools.lru_cache(maxsize=1)
def _analyzer() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # type: ignore[import-untyped]

    return SentimentIntensityAnalyzer()


def vader_compound(texts: Sequence[str]) -> list[float]:
    """VADER's compound score of each text, in [-1, 1] (-1 most negative, +1 most positive,
    0 for a text with no sentiment word, e.g. an empty one)."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]
