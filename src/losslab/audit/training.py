"""``losslab audit CONFIG.yaml``: the normalisation (:mod:`losslab.audit.normalisation`) and
loss-scale (:mod:`losslab.audit.scale`) checks of a ``losslab train`` config, or of every variant
of a ``losslab compare`` study (its first seed), as one :class:`AuditReport`.

Tables: ``normalisation`` (one row per loss x comparison), ``loss terms`` (one row per term and
variant) and, for a study, ``variants`` (each variant's total loss and gradient norm at the start).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from losslab.audit.findings import AuditReport, Finding, Level
from losslab.audit.normalisation import LossUnderTest, TwoProcessStep, check_normalisation
from losslab.audit.processes import torchrun, two_process_step
from losslab.audit.scale import check_scale, check_spread
from losslab.audit.setup import audit_batch, build_setup, load_loss_func, prepared_config
from losslab.config import read_config
from losslab.data.builtin import BUILTIN_DATA_PREFIX
from losslab.errors import UserError
from losslab.train.config import TrainConfig
from losslab.train.task import plan_loss

KINDS: dict[str, tuple[Level, str]] = {
    "accumulation_mismatch": ("error", "B/2 x accumulation 2 gives another first step than B x 1"),
    "packing_mismatch": ("error", "the batch packed into one row gives another first step than padded"),
    "processes_mismatch": ("error", "2 processes of B/2 give another first step than 1 process of B"),
    "check_skipped": ("info", "a comparison that could not run here (no torchrun, no packing for the task)"),
    "check_failed": ("warning", "a comparison that started and failed (torchrun exited or timed out): not verified"),
    "term_gradient_share_low": ("warning", "a loss term below 1 % of the gradient norm at the start"),
    "term_weight_zero_at_start": ("info", "a loss term whose scheduled weight is 0 at step 0"),
    "loss_scale_spread": ("warning", "a study's variants whose losses or gradient norms differ 10x or more"),
}
"""The finding kinds of a config audit: level and meaning (docs/audit-training.md documents each)."""


def train_configs(path: str | Path, overrides: list[str] | None = None) -> list[tuple[str | None, TrainConfig, str]]:
    """``(variant name or None, training config, where)`` for a train config (one) or a study (each
    variant at its first seed); every config and loss plan is checked before anything is built."""
    file = read_config(path, overrides)
    if isinstance(file.data, dict) and "variants" in file.data:
        from losslab.compare.config import load_study

        study = load_study(path, overrides)
        seed = study.config.seeds[0]
        out: list[tuple[str | None, TrainConfig, str]] = []
        for i, variant in enumerate(study.config.variants):
            line = study.lines.get(("variants", str(i)))
            out.append((variant.name, study.check(variant, seed), f"{path}:{line}" if line else str(path)))
        return out
    config = file.validate(TrainConfig)
    spec = config.data.train
    if spec and not spec.startswith(BUILTIN_DATA_PREFIX) and not Path(spec).expanduser().is_file():
        raise UserError(f"data file not found: {spec}", where=file.where("data", "train"))
    plan_loss(config, where=file.where("loss", "terms"), term_where=lambda i: file.where("loss", "terms", str(i)))
    line = file.lines.get(("loss", "terms")) or file.lines.get(("loss",))
    return [(None, config, f"{path}:{line}" if line else str(path))]


def audit_config(path: str | Path, args: argparse.Namespace) -> AuditReport:
    """The report of ``losslab audit CONFIG.yaml``. Reads from ``args``: ``loss_func`` (a
    ``--loss-func MODULE:FUNCTION`` to check as well; optional), ``processes`` (``auto``: the
    two-process comparison runs where torchrun is installed; ``off``) and ``overrides`` (optional)."""
    configs = train_configs(path, getattr(args, "overrides", None))
    spec = getattr(args, "loss_func", None)
    user = LossUnderTest(f"--loss-func {spec}", spec, load_loss_func(spec)) if spec else None
    report = AuditReport(title=f"losslab audit {path}: normalisation and loss scale")
    norm_rows: list[dict] = []
    term_rows: list[dict] = []
    summaries: dict[str, dict] = {}
    use_processes = getattr(args, "processes", "auto") != "off" and torchrun() is not None
    with contextlib.redirect_stdout(sys.stderr):  # (building a task prints its data summary)
        for variant, config, where in configs:
            batch = audit_batch(config)
            audited = prepared_config(config, batch)
            setup = build_setup(audited, batch)
            losses = [LossUnderTest(f"losslab loss ({', '.join(t['name'] for t in setup.plan.terms)})")]
            if user is not None and config.task == "causal_lm":
                losses.append(user)
            elif user is not None:
                report.findings.append(
                    Finding(
                        "check_skipped",
                        "info",
                        f"--loss-func is checked on causal_lm configs only (a Trainer's compute_loss_func on the "
                        f"model's outputs); task {config.task}{f' (variant {variant})' if variant else ''}",
                        where,
                    )
                )
            two: TwoProcessStep | None = None
            if use_processes:

                def two(loss_spec: str | None, collator: str, audited: TrainConfig = audited, batch: int = batch):
                    return two_process_step(audited, batch, loss_func=loss_spec, collator=collator)

            rows, findings = check_normalisation(setup, losses, two_processes=two, where=where, variant=variant)
            norm_rows += rows
            report.findings += findings
            rows, findings, summary = check_scale(setup, where=where, variant=variant)
            term_rows += rows
            report.findings += findings
            summaries[variant or "config"] = summary
    report.tables["normalisation"] = norm_rows
    report.tables["loss terms"] = term_rows
    if len(configs) > 1:
        rows, findings = check_spread(summaries, where=str(path))
        report.tables["variants"] = rows
        report.findings += findings
    return report
