"""Part 4 of ``losslab audit CONFIG.yaml``: how large is each loss term at the start of training?

On the first training batch (``batch_size`` samples, step 0 of the weight schedules) every term's
value and the gradient of its weighted value with respect to the model's parameters (autograd,
one term at a time): its norm, its share of the sum of the terms' norms (``norm_share``, the
shares add up to 1) and its projection on the total gradient ``<g_k, g> / ||g||^2`` (adds up to
1 too; negative: the term pulls against the rest). A term with a weight above 0 whose share is
below :data:`LOW_SHARE` hardly trains anything (``term_gradient_share_low``); across the variants
of a study, total losses or gradient norms that differ :data:`SPREAD` x or more make learning rates
and weights incomparable (``loss_scale_spread``).
"""

from __future__ import annotations

import math

import torch

from losslab.audit.findings import Finding
from losslab.audit.setup import AuditSetup

LOW_SHARE = 0.01
"""A term below this share of the gradient norm is reported (warning)."""
SPREAD = 10.0
"""Variants whose total losses (or gradient norms) differ by this factor or more are reported."""


def term_gradients(
    setup: AuditSetup,
) -> tuple[dict[str, float], dict[str, float], dict[str, list[torch.Tensor] | None]]:
    """Every term's unweighted value, its weight at step 0 and the gradient of ``weight x value``
    (None for a term without a graph: weight 0 or no trainable input), on the first batch."""
    run = setup.run
    adapter = setup.adapter()
    batch_size = min(setup.config.training.batch_size, len(run.train))
    batch = (
        setup.padded(run.train[:batch_size])
        if setup.packed is None or not setup.config.data.packing
        else setup.packed(run.train[:batch_size])
    )
    params = [p for p in run.model.parameters() if p.requires_grad]
    device = params[0].device  # (the Trainer of the normalisation check may have moved the model)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    run.model.train()
    adapter.compute_loss(run.model, batch, None)
    out = adapter.last
    assert out is not None
    values = {label: float(v.detach()) for label, v in out.values.items()}
    grads: dict[str, list[torch.Tensor] | None] = {}
    labels = list(out.values)
    for i, label in enumerate(labels):
        weighted = out.weights[label] * out.values[label]
        if out.weights[label] == 0 or not weighted.requires_grad:
            grads[label] = None
            continue
        got = torch.autograd.grad(weighted, params, retain_graph=i < len(labels) - 1, allow_unused=True)
        grads[label] = [g if g is not None else torch.zeros_like(p) for g, p in zip(got, params)]
    return values, dict(out.weights), grads


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def check_scale(
    setup: AuditSetup, *, where: str = "", variant: str | None = None
) -> tuple[list[dict], list[Finding], dict]:
    """The rows (one per term), findings and a summary (``loss``: the weighted total, ``grad_norm``:
    the total gradient's norm) of the terms of ``setup``'s loss."""
    values, weights, grads = term_gradients(setup)
    present = [g for g in grads.values() if g is not None]
    total = [sum(parts) for parts in zip(*present)] if present else []
    total_sq = sum(float(t.double().pow(2).sum()) for t in total)
    norms = {label: _norm(g) if g is not None else 0.0 for label, g in grads.items()}
    norm_sum = sum(norms.values())
    rows: list[dict] = []
    findings: list[Finding] = []
    for label, value in values.items():
        g = grads[label]
        projection = (
            sum(float((a.double() * b.double()).sum()) for a, b in zip(g, total)) / total_sq
            if g is not None and total_sq
            else 0.0
        )
        share = norms[label] / norm_sum if norm_sum else 0.0
        row = {
            "variant": variant,
            "term": label,
            "value": value,
            "weight": weights[label],
            "weighted": weights[label] * value,
            "grad_norm": norms[label],
            "norm_share": share,
            "projection": projection,
        }
        if variant is None:
            row.pop("variant")
        rows.append(row)
        name = f"term {label!r}{f' (variant {variant})' if variant else ''}"
        if weights[label] == 0:
            findings.append(
                Finding(
                    "term_weight_zero_at_start",
                    "info",
                    f"{name}: weight 0 at step 0 (a schedule): it does not train at the start",
                    where,
                )
            )
        elif len(values) > 1 and share < LOW_SHARE:
            findings.append(
                Finding(
                    "term_gradient_share_low",
                    "warning",
                    f"{name}: {share:.3%} of the gradient norm at the start of training (value {value:.4g}, weight "
                    f"{weights[label]:g}, gradient norm {norms[label]:.3g} of {norm_sum:.3g}); below {LOW_SHARE:.0%} "
                    "it hardly changes the model: raise its weight or drop it",
                    where,
                    details={"term": label, "norm_share": share, "grad_norm": norms[label], "value": value},
                )
            )
    summary = {"loss": sum(weights[k] * v for k, v in values.items()), "grad_norm": math.sqrt(total_sq)}
    return rows, findings, summary


def check_spread(summaries: dict[str, dict], *, where: str = "") -> tuple[list[dict], list[Finding]]:
    """Across variants (name -> :func:`check_scale`'s summary): one row each, and a finding when
    the total losses or gradient norms differ :data:`SPREAD` x or more."""
    rows = [{"variant": name, "loss": s["loss"], "grad_norm": s["grad_norm"]} for name, s in summaries.items()]
    findings: list[Finding] = []
    for key, what in (("loss", "total losses"), ("grad_norm", "gradient norms")):
        sizes = {name: abs(s[key]) for name, s in summaries.items()}
        if len(sizes) < 2:
            continue
        big, small = max(sizes, key=sizes.__getitem__), min(sizes, key=sizes.__getitem__)
        ratio = sizes[big] / sizes[small] if sizes[small] else math.inf
        if ratio >= SPREAD:
            findings.append(
                Finding(
                    "loss_scale_spread",
                    "warning",
                    f"the variants' {what} at the start of training differ {ratio:.3g}x: {big} {sizes[big]:.4g}, "
                    f"{small} {sizes[small]:.4g}; one learning rate (and max_grad_norm) does not suit both",
                    where,
                    details={"quantity": key, "ratio": ratio, "largest": big, "smallest": small},
                )
            )
    return rows, findings
