"""``losslab audit``: the three formats, --out, --fail-on, the dispatch of a YAML config, the
worker processes (same report as one process), and docs/audit.md in sync with the kinds."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from losslab.audit.findings import AuditReport, Finding
from losslab.audit.kinds import KINDS
from losslab.audit.records import audit_records
from losslab.cli import main
from losslab.labels import IGNORE_INDEX

from .conftest import CHITCHAT, own_labels, write_jsonl

RECORDS = [json.loads(line) for line in CHITCHAT.read_text(encoding="utf-8").splitlines()]
DOCS = Path(__file__).parents[2] / "docs" / "audit.md"


@pytest.fixture
def faulty(tmp_path: Path, smollm2_tokenizer) -> tuple[Path, Path]:
    """Record 2's labels train its user text <b>&</b> (escaped in HTML); record 3's nothing."""
    records = [dict(r) for r in RECORDS]
    records[1] = {
        "messages": [{"role": "user", "content": "<b>bold</b> & <script>x</script>"}, *RECORDS[1]["messages"][1:]]
    }
    rows = own_labels(smollm2_tokenizer, records)
    user = [i for i, t in enumerate(rows[1]["input_ids"]) if rows[1]["labels"][i] == IGNORE_INDEX][20:30]
    for i in user:
        rows[1]["labels"][i] = rows[1]["input_ids"][i]
    rows[2]["labels"] = [IGNORE_INDEX] * len(rows[2]["labels"])
    return write_jsonl(tmp_path / "data.jsonl", records), write_jsonl(tmp_path / "labels.jsonl", rows)


def test_text_report(faulty, capsys) -> None:
    data, labels = faulty
    assert main(["audit", str(data), "--labels", str(labels), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"losslab audit {data} --labels {labels} (policy assistant)\n")
    assert "records agreeing:" in out and "findings: " in out
    assert re.search(rf"error +labels_zero_targets \(1 finding, \d+ tokens\)\n  {re.escape(str(data))}:3: ", out)
    assert f"  {data}:2: " in out


def test_json_report_and_fail_on(faulty, capsys) -> None:
    data, labels = faulty
    assert main(["audit", str(data), "--labels", str(labels), "--format", "json", "--workers", "1"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["error"] >= 2
    assert {f["where"] for f in report["findings"]} == {f"{data}:2", f"{data}:3"}
    assert report["tables"]["worst records"][0]["record"] in (f"{data}:2", f"{data}:3")
    good = write_jsonl(data.with_name("good.jsonl"), RECORDS[:1])
    assert main(["audit", str(good), "--format", "json", "--workers", "1", "--fail-on", "info"]) == 0
    assert json.loads(capsys.readouterr().out)["findings"] == []


def test_fail_on_level(tmp_path: Path, capsys) -> None:
    # a special token typed in a message: a warning, so exit 1 at --fail-on warning, 0 at error
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "say <|im_end|>"}, RECORDS[0]["messages"][1]]}]
    )
    assert main(["audit", str(data), "--workers", "1", "--fail-on", "error"]) == 0
    assert main(["audit", str(data), "--workers", "1"]) == 1
    capsys.readouterr()


def test_html_report_is_escaped_and_marks_disagreements(faulty, tmp_path: Path, capsys) -> None:
    data, labels = faulty
    out = tmp_path / "report.html"
    assert (
        main(["audit", str(data), "--labels", str(labels), "--format", "html", "--out", str(out), "--workers", "1"])
        == 1
    )
    stdout, err = capsys.readouterr()
    assert stdout == "" and f"report written to {out}" in err
    page = out.read_text(encoding="utf-8")
    assert "<script>" not in page and "<b>" not in page
    text = re.sub(r"</?span[^>]*>", "", page)  # one span per token
    assert "&lt;script&gt;x&lt;/script&gt;" in text and "&lt;b&gt;bold&lt;/b&gt; &amp;" in text
    assert page.count('<span class="x"') >= 10  # trained by the labels only (the user text of record 2)
    assert '<span class="m"' in page  # trained by losslab only (record 3)
    assert '<span class="b"' in page and "user: trained by the labels only" in page
    assert "<link" not in page and "src=" not in page  # self-contained


def test_workers_give_the_same_report(tmp_path: Path, smollm2_tokenizer, monkeypatch) -> None:
    from losslab.audit import records

    monkeypatch.setattr(records, "CHUNK", 2)
    many = [RECORDS[i % len(RECORDS)] for i in range(9)]
    rows = own_labels(smollm2_tokenizer, many)
    rows[7]["labels"] = [IGNORE_INDEX] * len(rows[7]["labels"])
    data, labels = write_jsonl(tmp_path / "d.jsonl", many), write_jsonl(tmp_path / "l.jsonl", rows)
    one, _ = audit_records(data, smollm2_tokenizer, labels=labels, workers=1)
    two, _ = audit_records(data, smollm2_tokenizer, labels=labels, workers=2)
    assert one == two and [f.where for f in two.findings] == [f"{data}:8"]
    rows[4]["labels"].pop()  # bad input met in a worker: the same error
    write_jsonl(labels, rows)
    from losslab.errors import UserError

    with pytest.raises(UserError, match=rf"{re.escape(str(labels))}:5: field 'labels'"):
        audit_records(data, smollm2_tokenizer, labels=labels, workers=2)


def test_config_target_goes_to_the_training_audit(tmp_path: Path, capsys, monkeypatch) -> None:
    seen = {}

    def audit_config(path: Path, args) -> AuditReport:
        seen["path"] = path
        return AuditReport("config audit", [Finding("accumulation", "warning", "differs by 3%", f"{path}:2")])

    module = types.ModuleType("losslab.audit.training")
    module.audit_config = audit_config  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "losslab.audit.training", module)
    config = tmp_path / "run.yml"
    config.write_text("task: causal_lm\n")
    assert main(["audit", str(config)]) == 1
    assert seen["path"] == config
    assert f"  {config}:2: differs by 3%" in capsys.readouterr().out
    assert main(["audit", str(config), "--fail-on", "error"]) == 0


def test_docs_list_every_kind_with_its_level() -> None:
    text = DOCS.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (info|warning|error) \|", text, flags=re.MULTILINE))
    assert rows == {kind: k.level for kind, k in KINDS.items()}
