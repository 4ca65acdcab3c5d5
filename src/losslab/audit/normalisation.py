"""Part 3 of ``losslab audit CONFIG.yaml``: is the loss normalised over the whole optimizer step?

One step of the Trainer on a fixed batch of B samples (padded, B x accumulation 1, one process) is
the reference. The same samples are then stepped as B/2 x accumulation 2, packed into one row
(causal LMs), and on 2 processes of B/2 (``torchrun``, gloo). A loss normalised by the step's
global count of trained items (``num_items_in_batch``) gives the same loss and gradients in every
case; a loss that averages per micro-batch, per row or per process does not. Each comparison is
one table row: the relative differences of the loss, the gradient norm, the gradient
(||g - g_ref|| / ||g_ref||) and the worst parameter tensor's, computed in float64 on float64
weights; it passes when the loss's and the worst tensor's are at most :data:`TOLERANCE`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from losslab.audit.findings import Finding
from losslab.audit.one_step import Step, UserLoss, step_difference, trainer_step
from losslab.audit.setup import AuditSetup
from losslab.errors import UserError
from losslab.train.adapter import LossAdapter

TOLERANCE = 1e-5
"""The largest relative difference that passes (float64 weights; losslab's losses are near 1e-7,
the float32 precision of the Trainer's logged loss)."""

FINDING_KINDS = {
    "accumulation": "accumulation_mismatch",
    "packing": "packing_mismatch",
    "processes": "processes_mismatch",
}

TwoProcessStep = Callable[[str | None, str], Step]
"""``(loss_func spec or None, collator padded|packed) -> Step`` on 2 processes (see :mod:`losslab.audit.processes`)."""


@dataclass(frozen=True)
class LossUnderTest:
    """losslab's loss of the config (``spec`` None) or a user's ``compute_loss_func`` (``spec``:
    the ``--loss-func`` value, ``func``: the loaded callable)."""

    label: str
    spec: str | None = None
    func: UserLoss | None = None

    def make(self, setup: AuditSetup) -> LossAdapter | UserLoss:
        return self.func if self.func is not None else setup.adapter()


def check_normalisation(
    setup: AuditSetup,
    losses: list[LossUnderTest],
    *,
    two_processes: TwoProcessStep | None = None,
    where: str = "",
    variant: str | None = None,
) -> tuple[list[dict], list[Finding]]:
    """The table rows and findings of every comparison for each loss in ``losses``.
    ``two_processes``: None skips that comparison (an ``info`` finding says why)."""
    rows: list[dict] = []
    findings: list[Finding] = []
    b = len(setup.samples)
    model, seed = setup.run.model, setup.config.seed
    for subject in losses:

        def step(collator_name: str, batch_size: int, grad_accum: int = 1, subject: LossUnderTest = subject) -> Step:
            collator = setup.packed if collator_name == "packed" and setup.packed is not None else setup.padded
            return trainer_step(
                model,
                setup.samples,
                collator,
                subject.make(setup),
                batch_size=batch_size,
                grad_accum=grad_accum,
                seed=seed,
            )

        try:
            ref = step("padded", b)
        except Exception as exc:  # the user's loss (or the config's terms) on the reference step
            if subject.func is None:
                raise
            raise UserError(
                f"argument --loss-func: {subject.spec} raised {type(exc).__name__}: {exc}", where=where
            ) from None
        cases: list[tuple[str, str, Callable[[], Step] | None, str]] = [
            ("accumulation", f"{b // 2} x accumulation 2 vs {b} x 1", lambda: step("padded", b // 2, 2), "")
        ]
        packed_why = "" if setup.packed is not None else f"task {setup.config.task} has no packing"
        cases.append(("packing", f"{b} packed into one row vs {b} padded", (lambda: step("packed", b)), packed_why))
        proc_why = "" if two_processes is not None else "torchrun not available (or --processes off)"
        two_step: Callable[[], Step] | None = None
        if two_processes is not None:
            run_two, spec = two_processes, subject.spec

            def two_step(run_two: TwoProcessStep = run_two, spec: str | None = spec) -> Step:
                return run_two(spec, "padded")

        cases.append(("processes", f"2 processes x {b // 2} vs 1 x {b}", two_step, proc_why))
        for check, setup_text, run_case, why_not in cases:
            row = {"variant": variant, "loss": subject.label, "check": check, "setup": setup_text}
            if variant is None:
                row.pop("variant")
            if why_not or run_case is None:
                rows.append({**row, "verdict": "skipped", "note": why_not})
                findings.append(
                    Finding("check_skipped", "info", f"{check} check skipped for {subject.label}: {why_not}", where)
                )
                continue
            try:
                other = run_case()
            except (RuntimeError, subprocess.SubprocessError) as exc:  # torchrun failed or timed out
                why = f"it failed: {str(exc)[-500:]}"
                rows.append({**row, "verdict": "skipped", "note": why})
                findings.append(
                    Finding("check_failed", "warning", f"{check} check not verified for {subject.label}: {why}", where)
                )
                continue
            d = step_difference(other, ref)
            passed = d.loss <= TOLERANCE and d.grad_max <= TOLERANCE
            rows.append(
                {
                    **row,
                    "loss_ref": ref.loss,
                    "loss_other": other.loss,
                    "loss_rel": d.loss,
                    "grad_norm_rel": d.grad_norm,
                    "grad_rel": d.grad,
                    "grad_max_rel": d.grad_max,
                    "verdict": "pass" if passed else "FAIL",
                }
            )
            if not passed:
                factor = other.loss / ref.loss if ref.loss else float("inf")
                findings.append(
                    Finding(
                        FINDING_KINDS[check],
                        "error",
                        f"{subject.label}{f' (variant {variant})' if variant else ''}: {setup_text} changes the "
                        f"first step: loss {other.loss:.6g} vs {ref.loss:.6g} ({factor:.4g}x, relative difference "
                        f"{d.loss:.3g}), gradient relative difference {d.grad:.3g} (worst tensor {d.grad_max:.3g}, "
                        f"{d.worst_param}); limit {TOLERANCE:g}. The loss is not normalised by the step's global "
                        "count of trained items (num_items_in_batch)",
                        where,
                        details={
                            "check": check,
                            "loss": subject.label,
                            "loss_ref": ref.loss,
                            "loss_other": other.loss,
                            "loss_rel": d.loss,
                            "grad_rel": d.grad,
                            "grad_max_rel": d.grad_max,
                            "worst_param": d.worst_param,
                        },
                    )
                )
    return rows, findings
