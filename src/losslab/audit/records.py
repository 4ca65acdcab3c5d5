"""The records audit: every record of a data file through losslab's mask, the dataset checks and,
with a labels file, the comparison with another framework's labels; in several processes.

:func:`audit_records` returns an :class:`~losslab.audit.findings.AuditReport` (findings in file
order; tables ``totals``, ``parts``, ``kinds``, ``worst records``) and the views of the worst
records for the HTML page. Bad input (a record that does not validate, a labels line that does
not parse or does not fit, fewer or more label lines than records) is a ``UserError`` naming
the file and line, whichever process met it: the first in file order is raised.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from losslab.audit.agreement import Agreement, compare, finding
from losslab.audit.dataset_checks import dataset_findings
from losslab.audit.findings import AuditReport, Finding
from losslab.audit.kinds import KINDS
from losslab.audit.labels_file import ForeignLabels, iter_label_lines, parse_labels
from losslab.audit.reference import PART_NAMES, Part, RecordView, Reference
from losslab.data.records import Source, UnreadableRecord, describe_validation_error, iter_raw_records
from losslab.data.schemas import ChatRecord, InstructionRecord
from losslab.errors import UserError
from losslab.masking.build import file_schema
from losslab.masking.policies import parse_policy

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHUNK = 64  # records per task of a worker process
LEVEL_WEIGHT = {"error": 100, "warning": 10, "info": 1}


@dataclass
class RecordResult:
    """What one record gave: its findings and its counts (small: it crosses processes)."""

    where: str
    findings: list[Finding]
    parts: np.ndarray  # (len(Part), 3) int64: tokens, trained by losslab, trained by the labels
    agree: bool | None  # the labels agree with losslab on every compared token (None: no labels)
    extra: int = 0  # tokens trained by the labels only
    missing: int = 0  # tokens trained by losslab only
    truncated: bool = False
    labels_trained: int = 0

    @property
    def score(self) -> float:
        """How bad the record is (for the worst records): findings by level, then disagreeing tokens."""
        return sum(LEVEL_WEIGHT[f.level] for f in self.findings) * 1000 + self.extra + self.missing


@dataclass
class Shown:
    """A worst record for the HTML page: the view and, with labels, their mask in its positions."""

    view: RecordView
    agreement: Agreement | None
    findings: list[Finding] = field(default_factory=list)


@dataclass
class _Item:
    source: Source
    raw: Any
    label: tuple[int, str] | None  # (line, text) of its labels line


class RecordsAudit:
    """Audits single records (in this process or a worker)."""

    def __init__(
        self,
        reference: Reference,
        schema: type[ChatRecord | InstructionRecord],
        labels_file: str | None,
    ) -> None:
        self.reference = reference
        self.schema = schema
        self.labels_file = labels_file

    def record(self, item: _Item) -> ChatRecord | InstructionRecord:
        if isinstance(item.raw, UnreadableRecord):
            raise UserError(item.raw.message, where=str(item.source))
        if not isinstance(item.raw, dict):
            raise UserError(f"expected a JSON object, got {type(item.raw).__name__}", where=str(item.source))
        try:
            return self.schema.model_validate(item.raw)
        except ValidationError as exc:
            raise UserError(describe_validation_error(exc), where=str(item.source)) from None

    def labels(self, item: _Item) -> ForeignLabels | None:
        if item.label is None or self.labels_file is None:
            return None
        line, text = item.label
        return parse_labels(self.labels_file, line, text, self.reference.vocab_size)

    def examine(self, item: _Item) -> tuple[RecordView, Agreement | None, list[Finding]]:
        record = self.record(item)
        labels = self.labels(item)  # bad labels are reported before the record is rendered
        try:
            view = self.reference.view(record, item.source)
        except UserError as exc:
            raise UserError(exc.message, where=str(item.source)) from None
        findings = dataset_findings(view, self.reference)
        agreement = None
        if labels is not None:
            agreement = compare(
                view, labels, max_length=self.reference.config.max_length, name=self.reference.token_name
            )
            findings = agreement.findings + findings
        return view, agreement, findings

    def result(self, item: _Item) -> RecordResult:
        view, agreement, findings = self.examine(item)
        parts = np.zeros((len(Part), 3), dtype=np.int64)
        part = view.part.astype(np.int64)
        parts[:, 0] = np.bincount(part, minlength=len(Part))
        parts[:, 1] = np.bincount(part, weights=view.trained, minlength=len(Part)).astype(np.int64)
        if agreement is None:
            return RecordResult(str(view.source), findings, parts, None, truncated=view.truncated)
        parts[:, 2] = np.bincount(part, weights=agreement.trained, minlength=len(Part)).astype(np.int64)
        disagree = any(f.kind in _DISAGREEMENT for f in findings)
        return RecordResult(
            str(view.source),
            findings,
            parts,
            not disagree,
            int(agreement.extra.sum()),
            int(agreement.missing.sum()),
            view.truncated,
            int(agreement.trained.sum()),
        )


_DISAGREEMENT = {k for k in KINDS if k not in ("labels_truncated", "tokens_differ")} - {
    "zero_targets",
    "truncated_to_zero",
    "special_token_text",
    "boundary_shift",
    "not_prefix_stable",
    "unrendered_message",
}

_WORKER: RecordsAudit | None = None


def _run_chunk(items: list[_Item]) -> list[RecordResult | tuple[str, str | None]]:
    """A worker's task: results, or ``(message, where)`` for a record that is bad input."""
    assert _WORKER is not None
    out: list[RecordResult | tuple[str, str | None]] = []
    for item in items:
        try:
            out.append(_WORKER.result(item))
        except UserError as exc:
            out.append((exc.message, exc.where))
    return out


def audit_records(
    data: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    labels: str | Path | None = None,
    mask: str | None = None,
    template: str | None = None,
    max_length: int | None = None,
    limit: int | None = None,
    workers: int = 1,
    worst: int = 10,
) -> tuple[AuditReport, list[Shown]]:
    """Audit the records of ``data`` (and ``labels``, one line per record); see the module doc."""
    reference = Reference(tokenizer, mask=mask, template=template, max_length=max_length)
    schema = file_schema("auto", data)
    items = _items(data, labels, limit)
    auditor = RecordsAudit(reference, schema, None if labels is None else str(labels))
    results: list[RecordResult] = []
    for got in _results(auditor, items, workers):
        if isinstance(got, tuple):
            raise UserError(got[0], where=got[1])
        results.append(got)
    report = _report(results, data, labels, parse_policy(mask, _kind(schema)).value)
    ranked = sorted(range(len(results)), key=lambda i: -results[i].score)
    shown = []
    for i in ranked[:worst]:
        if results[i].score <= 0:
            break
        view, agreement, findings = auditor.examine(items[i])
        shown.append(Shown(view, agreement, findings))
    return report, shown


def _results(
    auditor: RecordsAudit, items: list[_Item], workers: int
) -> Iterator[RecordResult | tuple[str, str | None]]:
    global _WORKER
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
    fork = "fork" in multiprocessing.get_all_start_methods()
    if workers <= 1 or len(chunks) < 2 or not fork:
        _WORKER = auditor
        try:
            for chunk in chunks:
                yield from _run_chunk(chunk)
        finally:
            _WORKER = None
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER = auditor  # inherited by the forked workers
    try:
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=multiprocessing.get_context("fork")) as pool:
            for got in pool.map(_run_chunk, chunks):
                yield from got
    finally:
        _WORKER = None


def _items(data: str | Path, labels: str | Path | None, limit: int | None) -> list[_Item]:
    """The records (raw, validated later) paired with their labels lines."""
    items: list[_Item] = []
    for source, raw in iter_raw_records(data):
        if limit is not None and len(items) >= limit:
            break
        items.append(_Item(source, raw, None))
    if labels is None:
        return items
    lines = iter_label_lines(labels)
    for item in items:
        item.label = next(lines, None)
        if item.label is None:
            got = sum(1 for i in items if i.label is not None)
            raise UserError(
                f"no labels line for this record: {labels} has {got} line{'s' * (got != 1)} for "
                f"{len(items)}{'' if limit is None else ' (--limit)'} records; one line per record, in the same order",
                where=str(item.source),
            )
    extra = next(lines, None)
    if extra is not None and limit is None:
        raise UserError(
            f"a labels line with no record: {data} has {len(items)} record{'s' * (len(items) != 1)}; "
            "one line per record, in the same order",
            where=f"{labels}:{extra[0]}",
        )
    return items


def _report(
    results: Sequence[RecordResult],
    data: str | Path,
    labels: str | Path | None,
    policy: str,
) -> AuditReport:
    findings = [f for r in results for f in r.findings]
    with_labels = labels is not None
    if with_labels and results and all(r.labels_trained == 0 for r in results):
        findings.insert(
            0,
            finding(
                "labels_empty",
                f"no record has a trained token in {labels} ({len(results)} record{'s' * (len(results) != 1)}): "
                "the run would train on "
                "nothing while its loss looks healthy (a chat template without {% generation %} markers gives "
                "an all-zero assistant mask)",
                str(labels),
                None,
                records=len(results),
            ),
        )
    parts = np.sum([r.parts for r in results], axis=0) if results else np.zeros((len(Part), 3), dtype=np.int64)
    totals: dict[str, Any] = {
        "records": len(results),
        "tokens": int(parts[:, 0].sum()),
        "trained by losslab": int(parts[:, 1].sum()),
    }
    if with_labels:
        totals["trained by the labels"] = int(parts[:, 2].sum())
        totals["records agreeing"] = sum(1 for r in results if r.agree)
        totals["tokens trained by the labels only"] = sum(r.extra for r in results)
        totals["tokens trained by losslab only"] = sum(r.missing for r in results)
    totals["records with findings"] = sum(1 for r in results if r.findings)
    totals["records truncated"] = sum(1 for r in results if r.truncated)
    part_rows = []
    for part in Part:
        row: dict[str, Any] = {
            "part": PART_NAMES[part],
            "tokens": int(parts[part, 0]),
            "trained by losslab": int(parts[part, 1]),
        }
        if with_labels:
            row["trained by the labels"] = int(parts[part, 2])
        if row["tokens"]:
            part_rows.append(row)
    kinds: Counter[str] = Counter(f.kind for f in findings)
    tokens: Counter[str] = Counter()
    for f in findings:
        tokens[f.kind] += f.count or 0
    kind_rows = [
        {"kind": k, "level": KINDS[k].level, "findings": n, "tokens": tokens[k], "meaning": KINDS[k].summary}
        for k, n in sorted(kinds.items(), key=lambda kv: (-_LEVEL_ORDER[KINDS[kv[0]].level], kv[0]))
    ]
    worst = sorted(results, key=lambda r: -r.score)[:10]
    worst_rows = [
        {
            "record": r.where,
            "findings": ", ".join(sorted({f.kind for f in r.findings})),
            **({"labels only": r.extra, "losslab only": r.missing} if with_labels else {}),
        }
        for r in worst
        if r.score > 0
    ]
    title = f"losslab audit {data}" + (f" --labels {labels}" if with_labels else "") + f" (policy {policy})"
    tables = {"totals": [totals], "parts": part_rows, "kinds": kind_rows}
    if worst_rows:
        tables["worst records"] = worst_rows
    return AuditReport(title, findings, tables)


_LEVEL_ORDER = {"info": 0, "warning": 1, "error": 2}


def _kind(schema: type[ChatRecord | InstructionRecord]) -> str:
    return "instruction" if schema is InstructionRecord else "chat"
