"""``losslab data prepare``: the command that prepares the builtin datasets and prints a summary.

The work is in :mod:`losslab.data.builtin`; this module is the command's handler only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from losslab.data.builtin import data_dir, prepare


def format_summary(manifests: list[dict], root: Path) -> str:
    rows = [("dataset", "schema", "records", "train", "validation", "test")]
    for m in manifests:
        s = m["splits"]
        rows.append((m["name"], m["schema"], str(m["records"]), str(s["train"]), str(s["validation"]), str(s["test"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines + [f"written to {root}"])


def run_prepare(args: argparse.Namespace) -> int:
    manifests = prepare(args.only, args.out, force=args.force)
    print(format_summary(manifests, data_dir(args.out)))
    return 0
