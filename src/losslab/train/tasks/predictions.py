"""Per-example predictions of the classification-style tasks, saved next to the metrics.

``evaluate`` writes ``OUTPUT_DIR/predictions_<split>.jsonl``: one JSON object per evaluated
example, in dataset order (as ``causal_lm`` writes ``generations_<split>.jsonl``), so that
``losslab compare`` can show the variants' outputs side by side and run a paired bootstrap over
the test examples (:mod:`losslab.compare.examples`). Fields per task:

- ``sequence_classification``: ``text``, ``gold``, ``predicted`` (class names, lists of names
  for ``multi_label``, numbers for ``regression``) and, for ``class``, ``score`` (the softmax
  probability of the predicted class);
- ``token_classification``: ``tokens``, ``gold``, ``predicted`` (a tag per scored word);
- ``reward_model``: ``prompt``, ``chosen``, ``rejected``, ``reward_chosen``, ``reward_rejected``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from losslab.files import write_atomic


def save_predictions(output_dir: str | Path | None, split: str, rows: Iterable[dict[str, Any]]) -> Path | None:
    """Write ``predictions_<split>.jsonl`` atomically into ``output_dir`` (nothing when it is None)."""
    if output_dir is None:
        return None
    path = Path(output_dir) / f"predictions_{split}.jsonl"
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path
