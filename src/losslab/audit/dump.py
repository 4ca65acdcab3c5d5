"""Write another framework's labels as the JSONL that ``losslab audit DATA --labels`` reads.

One line per record of DATA, in DATA's order: ``{"input_ids": [...], "labels": [...]}`` (or
``assistant_masks`` / ``completion_mask`` instead of ``labels``), padding removed. Feed it the
rows of a tokenised dataset or the batches of a collator, UNSHUFFLED::

    from losslab.audit.dump import dump_labels

    # TRL: the SFTTrainer's prepared dataset (input_ids and labels, one row per record) ...
    dump_labels(trainer.train_dataset, "labels.jsonl")
    # ... or what the loss really sees: the collator's batches, in order (padding dropped by attention_mask)
    loader = torch.utils.data.DataLoader(trainer.train_dataset, batch_size=8, collate_fn=trainer.data_collator)
    dump_labels(loader, "labels.jsonl")

A packing or padding-free collator merges records into one row and cannot be dumped per record:
dump before packing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from losslab.audit.labels_file import MASK_FIELDS
from losslab.errors import UserError
from losslab.files import write_atomic


def _as_list(value: Any) -> list[Any]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def label_rows(item: Mapping[str, Any]) -> Iterator[dict[str, list[int]]]:
    """The labels rows of one dataset row (1-D fields) or one collator batch (2-D, ``(B, T)``):
    ``input_ids`` and the first of ``labels``/``assistant_masks``/``completion_mask``, with the
    positions where ``attention_mask`` is 0 (padding) removed."""
    if "input_ids" not in item:
        raise UserError(f"a row or batch without input_ids (keys: {', '.join(map(str, item))})")
    name = next((f for f in MASK_FIELDS if f in item), None)
    if name is None:
        raise UserError(f"a row or batch without any of {', '.join(MASK_FIELDS)} (keys: {', '.join(map(str, item))})")
    ids, mask = _as_list(item["input_ids"]), _as_list(item[name])
    attention = _as_list(item["attention_mask"]) if "attention_mask" in item else None
    batched = bool(ids) and isinstance(ids[0], list)
    rows = zip(ids, mask, attention or [None] * len(ids)) if batched else [(ids, mask, attention)]
    for row_ids, row_mask, row_attention in rows:
        if row_attention is not None:
            keep = [k for k, a in enumerate(row_attention) if a]
            row_ids, row_mask = [row_ids[k] for k in keep], [row_mask[k] for k in keep]
        yield {"input_ids": [int(t) for t in row_ids], name: [int(v) for v in row_mask]}


def dump_labels(source: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    """Write the labels JSONL of every row or batch of ``source`` (in order) to ``path``;
    returns the number of lines (records) written."""
    lines = [json.dumps(row) + "\n" for item in source for row in label_rows(item)]
    write_atomic(Path(path), "".join(lines))
    return len(lines)
