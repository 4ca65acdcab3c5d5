"""An :class:`~losslab.audit.findings.AuditReport` as text (terminal), JSON or a self-contained
HTML page; any audit's report (records or config) renders here.

- text: the title, each table aligned, then the findings grouped by kind (most severe first),
  the first :data:`EXAMPLES` of each kind with their ``file:line``;
- json: ``{"title", "counts": {level: n}, "tables", "findings": [...]}``, every finding;
- html: the same tables and findings (text escaped), then the worst records with their tokens
  coloured: trained by both (green), by the labels only (red, struck through in the legend's
  sense: should not be trained), by losslab only (orange, underlined: should be trained),
  not trained (grey); without labels, losslab's mask (green). Hover a token for its id and part.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from itertools import groupby
from typing import Any

from losslab.audit.findings import LEVELS, AuditReport, Finding
from losslab.audit.records import Shown
from losslab.audit.reference import PART_NAMES, Part

EXAMPLES = 5  # findings shown per kind in the text view
HTML_EXAMPLES = 50


def counts(report: AuditReport) -> dict[str, int]:
    by_level = Counter(f.level for f in report.findings)
    return {level: by_level.get(level, 0) for level in reversed(LEVELS)}


def _grouped(findings: Sequence[Finding]) -> list[tuple[str, list[Finding]]]:
    """Findings by kind: errors first, then warnings, then info; kinds in first-seen order."""
    order = {level: i for i, level in enumerate(reversed(LEVELS))}
    first_seen: dict[str, int] = {}
    for i, f in enumerate(findings):
        first_seen.setdefault(f.kind, i)
    ranked = sorted(findings, key=lambda f: (order[f.level], first_seen[f.kind]))
    return [(kind, list(group)) for kind, group in groupby(ranked, key=lambda f: f.kind)]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table_text(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()
    out = ["  " + line]
    out += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return out


def format_text(report: AuditReport) -> str:
    out = [report.title, ""]
    for name, rows in report.tables.items():
        if len(rows) == 1:  # one row: a column of "name: value" lines
            width = max(len(k) for k in rows[0])
            out += [f"{name}:", *(f"  {k + ':':<{width + 1}} {_cell(v)}" for k, v in rows[0].items()), ""]
        elif rows:
            out += [f"{name}:", *_table_text(rows), ""]
    c = counts(report)
    if not report.findings:
        out.append("no findings")
    else:
        out.append("findings: " + ", ".join(f"{n} {level}" for level, n in c.items()))
        for kind, group in _grouped(report.findings):
            tokens = sum(f.count or 0 for f in group)
            more = f", {tokens} tokens" if tokens else ""
            out.append(f"{group[0].level:<8}{kind} ({len(group)} finding{'s' * (len(group) != 1)}{more})")
            for f in group[:EXAMPLES]:
                out.append(f"  {f.where}: {f.message}" if f.where else f"  {f.message}")
            if len(group) > EXAMPLES:
                out.append(f"  ... and {len(group) - EXAMPLES} more (--format json lists every one)")
    return "\n".join(out) + "\n"


def format_json(report: AuditReport) -> str:
    payload = {
        "title": report.title,
        "counts": counts(report),
        "tables": report.tables,
        "findings": [asdict(f) for f in report.findings],
    }
    return json.dumps(payload, indent=1, ensure_ascii=False, default=_plain) + "\n"


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)


_HEAD = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 80em; }}
table {{ border-collapse: collapse; margin: .5em 0 1em; }}
td, th {{ border: 1px solid #ccc; padding: .2em .5em; text-align: left; font-size: .9em; }}
pre {{ white-space: pre-wrap; word-break: break-all; font-family: monospace; border: 1px solid #ddd; padding: .6em; }}
.error {{ color: #b00020; }} .warning {{ color: #a15c00; }} .info {{ color: #555; }}
.u {{ color: #888; }}
.b, .t {{ background: rgba(40,167,69,.35); }}
.x {{ background: rgba(220,53,69,.45); }}
.m {{ background: rgba(255,153,0,.45); text-decoration: underline; }}
h2 {{ font-size: 1.1em; margin-top: 1.6em; }} h3 {{ font-size: 1em; }}
</style></head><body>
"""


def _table_html(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c, '')))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _tokens_html(item: Shown) -> str:
    view, agreement = item.view, item.agreement
    out = []
    cursor = view.offsets[0][0] if view.offsets else 0
    for i, (start, end) in enumerate(view.offsets):
        text = view.text[max(start, cursor) : end] if end > cursor else ""
        cursor = max(cursor, end)
        ours = bool(view.trained[i])
        part = PART_NAMES[Part(int(view.part[i]))]
        if agreement is None:
            cls, state = ("t", "trained") if ours else ("u", "not trained")
        else:
            theirs = bool(agreement.trained[i])
            if agreement.extra[i]:
                cls, state = "x", "trained by the labels only"
            elif agreement.missing[i]:
                cls, state = "m", "trained by losslab only"
            elif ours and theirs:
                cls, state = "b", "trained by both"
            else:
                cls, state = "u", "not trained" if agreement.compared[i] or i == 0 else "not compared"
        title = f"token {int(view.input_ids[i])}, {part}: {state}"
        out.append(f'<span class="{cls}" title="{html.escape(title)}">{html.escape(text)}</span>')
    return "".join(out)


def format_html(report: AuditReport, shown: Sequence[Shown] = ()) -> str:
    body = [_HEAD.format(title=html.escape(report.title)), f"<h1>{html.escape(report.title)}</h1>"]
    for name, rows in report.tables.items():
        if rows:
            body.append(f"<h2>{html.escape(name)}</h2>{_table_html(rows)}")
    body.append("<h2>findings</h2>")
    if not report.findings:
        body.append("<p>no findings</p>")
    for kind, group in _grouped(report.findings):
        level = group[0].level
        body.append(f'<h3 class="{level}">{level}: {html.escape(kind)} ({len(group)})</h3><ul>')
        for f in group[:HTML_EXAMPLES]:
            where = f"<code>{html.escape(f.where)}</code>: " if f.where else ""
            body.append(f"<li>{where}{html.escape(f.message)}</li>")
        if len(group) > HTML_EXAMPLES:
            body.append(f"<li>... and {len(group) - HTML_EXAMPLES} more (--format json lists every one)</li>")
        body.append("</ul>")
    if shown:
        body.append("<h2>worst records</h2>")
        if shown[0].agreement is not None:
            body.append(
                '<p>Tokens: <span class="b">trained by both</span>, <span class="x">trained by the labels only</span>, '
                '<span class="m">trained by losslab only</span>, <span class="u">not trained</span>. '
                "Hover a token for its id and part.</p>"
            )
        else:
            body.append(
                '<p>Tokens: <span class="t">trained by losslab</span>, <span class="u">not trained</span>. '
                "Hover a token for its id and part.</p>"
            )
        for item in shown:
            kinds = ", ".join(sorted({f.kind for f in item.findings})) or "no findings"
            body.append(f"<h3>{html.escape(str(item.view.source))}: {html.escape(kinds)}</h3>")
            body.append(f"<pre>{_tokens_html(item)}</pre>")
    body.append("</body></html>\n")
    return "".join(body)


def render(report: AuditReport, fmt: str, shown: Sequence[Shown] = ()) -> str:
    """The report in ``fmt``: text | json | html."""
    if fmt == "json":
        return format_json(report)
    if fmt == "html":
        return format_html(report, shown)
    return format_text(report)
