"""``losslab audit DATA | CONFIG.yaml``: the command's handler. A ``.yaml``/``.yml`` argument is a
``losslab train`` config or a ``losslab compare`` study (normalisation and loss-scale checks,
``losslab.audit.training.audit_config``); anything else is a records file (mask checks, against
``--labels`` when given: ``losslab.audit.records``).

The report goes to ``--out`` (written atomically) or standard output, as text, JSON or HTML;
the exit status is 1 when a finding is at or above ``--fail-on``, else 0 (bad input: 2, from
the ``UserError`` the CLI prints).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from losslab.audit.findings import AuditReport
from losslab.audit.records import Shown, audit_records
from losslab.audit.render import counts, render
from losslab.errors import UserError
from losslab.files import write_atomic

CONFIG_SUFFIXES = (".yaml", ".yml")


def run_audit(args: argparse.Namespace) -> int:
    shown: list[Shown] = []
    if Path(args.target).suffix.lower() in CONFIG_SUFFIXES:
        report = _audit_config(args)
    else:
        report, shown = _audit_records(args)
    text = render(report, args.format, shown)
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_atomic(Path(args.out), text)
        summary = ", ".join(f"{n} {level}" for level, n in counts(report).items())
        print(f"losslab audit: {summary}; report written to {args.out}", file=sys.stderr)
    return report.exit_status(args.fail_on)


RECORDS_ONLY = {
    "labels": None,
    "mask": None,
    "template": None,
    "max_length": None,
    "limit": None,
    "worst": 10,
    "workers": 0,
}
"""Options of a records audit, at their defaults: refused for a config (its data settings are the config's)."""


def _audit_config(args: argparse.Namespace) -> AuditReport:
    for name, default in RECORDS_ONLY.items():
        if getattr(args, name, default) != default:
            option = "--" + name.replace("_", "-")
            raise UserError(
                f"argument {option}: applies to a records audit only; {args.target} is a config "
                "(its data, mask and template settings are the config's own)"
            )
    try:
        training = importlib.import_module("losslab.audit.training")
    except ModuleNotFoundError as exc:
        if exc.name != "losslab.audit.training":
            raise
        raise UserError(
            "auditing a train/compare config (normalisation, loss scale) is not available in this version; "
            "give a records file to audit its masks"
        ) from None
    report: AuditReport = training.audit_config(Path(args.target), args)
    return report


CONFIG_ONLY = {"loss_func": None, "processes": "auto"}  # options of a config audit, at their defaults


def _audit_records(args: argparse.Namespace) -> tuple[AuditReport, list[Shown]]:
    from losslab.models import load_tokenizer

    for name, default in CONFIG_ONLY.items():
        if getattr(args, name, default) != default:
            option = "--" + name.replace("_", "-")
            raise UserError(f"argument {option}: applies to a CONFIG.yaml audit only; {args.target} is a records file")

    tokenizer = load_tokenizer(args.tokenizer)
    workers = args.workers or min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    return audit_records(
        args.target,
        tokenizer,
        labels=args.labels,
        mask=args.mask,
        template=args.template,
        max_length=args.max_length,
        limit=args.limit,
        workers=workers,
        worst=args.worst,
    )
