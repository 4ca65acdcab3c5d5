"""A task's records: each split read and validated, encoded into samples, and described
(samples, skipped records, truncated samples) for the log and the run summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from losslab.data.builtin import SPLITS, resolve_data_path
from losslab.data.records import SkipLog, Source, load_records
from losslab.errors import UserError
from losslab.train.config import TrainConfig


@dataclass
class SplitRecords:
    """The validated records of one split, with where each came from and what was skipped."""

    split: str
    path: str
    sources: list[Source]
    records: list[Any]
    skipped: SkipLog


def read_split(config: TrainConfig, split: str, schema: type[BaseModel]) -> SplitRecords | None:
    """The records of ``split`` (None when the config names no file for it), validated with
    ``schema``, bad ones raised or skipped per ``data.on_error``. The sample limit is applied
    by the task (a record may give several samples, or none)."""
    spec = getattr(config.data, split)
    if spec is None:
        return None
    path = resolve_data_path(spec, split)
    skipped = SkipLog()
    sources, records = [], []
    for source, record in load_records(path, schema, on_error=config.data.on_error, skipped=skipped):
        sources.append(source)
        records.append(record)
    if not records:
        raise UserError(f"no usable {split} records", where=str(path))
    return SplitRecords(split, str(path), sources, records, skipped)


def read_splits(config: TrainConfig, schema: type[BaseModel]) -> dict[str, SplitRecords]:
    """:func:`read_split` for every split the config names."""
    return {s: r for s in SPLITS if (r := read_split(config, s, schema)) is not None}


def skipped_records(splits: dict[str, SplitRecords]) -> dict[str, dict[str, Any]]:
    """Per split: how many bad records ``on_error: skip`` skipped and which (``file:line: reason``)."""
    return {split: records.skipped.to_dict() for split, records in splits.items()}


def sample_limit(config: TrainConfig, split: str) -> int | None:
    return config.data.max_train_samples if split == "train" else config.data.max_eval_samples


SplitEncoder = Callable[[str, SplitRecords], tuple[list[dict], int]]


def per_record(config: TrainConfig, encode_record: Callable[[Source, Any], tuple[dict, bool]]) -> SplitEncoder:
    """A split encoder for tasks with one sample per record: ``encode_record(source, record)
    -> (feature, truncated)`` on the first ``max_*_samples`` records."""

    def encode_split(split: str, records: SplitRecords) -> tuple[list[dict], int]:
        features, truncated = [], 0
        for source, record in list(zip(records.sources, records.records))[: sample_limit(config, split)]:
            feature, cut = encode_record(source, record)
            features.append(feature)
            truncated += cut
        return features, truncated

    return encode_split


def encode_splits(
    splits: dict[str, SplitRecords], encode_split: SplitEncoder
) -> tuple[dict[str, list[dict]], list[str]]:
    """The samples of every split (``encode_split(split, records) -> (features, truncated)``)
    and one printed log line per split."""
    datasets, lines = {}, []
    for split, records in splits.items():
        features, truncated = encode_split(split, records)
        datasets[split] = features
        lines.append(describe_split(split, len(features), records, truncated))
        print(lines[-1])
    return datasets, lines


def describe_split(split: str, n_samples: int, records: SplitRecords, truncated: int) -> str:
    """One line for the log and the summary: samples, skipped records, truncated samples."""
    text = f"{split}: {n_samples} samples from {records.path}"
    if records.skipped.count:
        text += f"; {records.skipped.count} bad records skipped (first: {records.skipped.examples[0]})"
    if truncated:
        text += f"; {truncated} truncated to max_length"
    return text
