"""``losslab audit DATA | CONFIG.yaml``: the command's handler. A ``.yaml``/``.yml`` argument is a
``losslab train`` config or a ``losslab compare`` study (normalisation and loss-scale checks);
anything else is a records file (mask checks, against ``--labels`` when given)."""

from __future__ import annotations

import argparse


def run_audit(args: argparse.Namespace) -> int:
    raise NotImplementedError("losslab audit")
