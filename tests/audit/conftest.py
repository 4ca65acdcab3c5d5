"""Shared pieces of the audit tests: a few real chit-chat records, SmolLM2's template with
generation markers, and labels files written from losslab's own mask (to spoil by hand)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from losslab.audit.reference import Reference
from losslab.data.records import Source
from losslab.data.schemas import ChatRecord
from losslab.labels import IGNORE_INDEX

DATA = Path(__file__).parent / "data"
CHITCHAT = DATA / "chitchat.jsonl"  # 4 conversations of the builtin chit-chat dataset (MIT)
TAGGED_TEMPLATE = DATA / "smollm2_generation.jinja"  # SmolLM2's template + {% generation %} around content + <|im_end|>


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def own_labels(tokenizer: Any, records: list[dict], **options: Any) -> list[dict[str, list[int]]]:
    """losslab's mask of each record as a labels row (what a correct framework gives)."""
    ref = Reference(tokenizer, **options)
    rows = []
    for i, rec in enumerate(records, 1):
        view = ref.view(ChatRecord.model_validate(rec), Source("x", i))
        ids = view.input_ids.tolist()
        rows.append({"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, view.trained)]})
    return rows


@pytest.fixture
def audit_files(tmp_path: Path, smollm2_tokenizer: Any) -> Callable[..., tuple[Path, Path]]:
    """``make(records, spoil=None, **options) -> (data, labels)``: the records and their correct labels,
    ``spoil(rows)`` changing the rows first."""

    def make(records: list[dict], spoil: Callable[[list[dict]], Any] | None = None, **options: Any):
        rows = own_labels(smollm2_tokenizer, records, **options)
        if spoil is not None:
            spoil(rows)
        return write_jsonl(tmp_path / "data.jsonl", records), write_jsonl(tmp_path / "labels.jsonl", rows)

    return make


@pytest.fixture(autouse=True)
def cached_tokenizer(monkeypatch: pytest.MonkeyPatch, smollm2_tokenizer: Any) -> None:
    """``losslab audit`` runs without loading the SmolLM2 tokenizer again for every call."""
    import losslab.models

    real = losslab.models.load_tokenizer

    def load(name: str, **kwargs: Any) -> Any:
        return smollm2_tokenizer if name == "builtin:smollm2-135m-instruct" else real(name, **kwargs)

    monkeypatch.setattr(losslab.models, "load_tokenizer", load)


def run_audit(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    """``losslab audit ARGS --format json``: the exit status and the parsed report."""
    from losslab.cli import main

    status = main(["audit", *args, "--format", "json", "--workers", "1"])
    out = capsys.readouterr().out
    return status, json.loads(out) if out else {}


def kinds(report: dict) -> dict[str, list[str]]:
    """kind -> the places of its findings."""
    out: dict[str, list[str]] = {}
    for f in report["findings"]:
        out.setdefault(f["kind"], []).append(f["where"])
    return out
