"""``losslab bench loss-head``: time and peak memory of three ways to train an LM head (plain
logits + loss, PyTorch's chunked ``linear_cross_entropy``, losslab's fused head; Liger Kernel's
on CUDA when installed), each case in its own subprocess. docs/fused-head.md#benchmark says
what each method is and how time and peak memory are measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from losslab.labels import IGNORE_INDEX

OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "focal": {"focal_gamma": 2.0},
    "z_loss": {"z_loss": 1e-4},
    "token_weights": {"token_weights": True},
}
METHODS = ("plain", "torch_chunked", "losslab", "liger")
# acceptance targets of the fused head (issue 8)
TARGETS = {
    "memory_vs_plain": 0.25,
    "memory_vs_torch_chunked": 1.05,
    "time_vs_plain": 0.6,
    "time_vs_torch_chunked": 0.6,
    "half_ignored_vs_all_valid": 0.6,
    "option_time_cost": 1.15,
    # "no extra memory": identical code paths measure up to ~5 % (about 11 MB at V=49152) apart
    # between subprocesses (allocator and MKL scratch buffers), so 5 % is the noise floor
    "option_memory_cost": 1.05,
}


# --- one case, inside a worker process ---------------------------------------------------------


def rss_mb(field: str) -> float | None:
    """This process's ``/proc/self/status`` memory figure ``field`` (VmRSS, VmHWM) in MB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Resets the peak RSS (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _loss_fn(
    method: str, option: str, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor | None
) -> Callable[[], torch.Tensor] | None:
    """The forward of one method for one option, or None where the method has no such option."""
    import torch.nn.functional as F

    from losslab.losses.fused import fused_linear_cross_entropy
    from losslab.losses.token import token_cross_entropy

    opts = {k: v for k, v in OPTIONS[option].items() if k != "token_weights"}
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)

    def weighted(per_token: torch.Tensor) -> torch.Tensor:
        assert token_weights is not None  # (only the token_weights option calls it)
        return (per_token.float() * token_weights).sum() / count

    if method == "losslab":
        return lambda: fused_linear_cross_entropy(h, w, labels, token_weights=token_weights, **opts)
    if method == "plain":
        if option in ("plain", "label_smoothing"):
            return lambda: F.cross_entropy((h @ w.T).float(), labels, **opts)
        if option == "token_weights":
            return lambda: weighted(F.cross_entropy((h @ w.T).float(), labels, reduction="none"))
        return lambda: token_cross_entropy(h @ w.T, labels, **opts)
    if method == "torch_chunked":
        chunked = torch.nn.LinearCrossEntropyOptions()
        if option == "plain":
            return lambda: F.linear_cross_entropy(h, w, labels, options=chunked)
        if option == "token_weights":
            return lambda: weighted(F.linear_cross_entropy(h, w, labels, reduction="none", options=chunked))
        return None  # label smoothing falls back to full logits; focal and z-loss do not exist
    if method == "liger":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None
        if h.device.type != "cuda" or option not in ("plain", "label_smoothing", "z_loss"):
            return None
        loss = LigerFusedLinearCrossEntropyLoss(
            label_smoothing=opts.get("label_smoothing", 0.0), lse_square_scale=opts.get("z_loss", 0.0)
        )
        return lambda: loss(w, h, labels)
    raise ValueError(f"unknown method {method!r}")


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the inputs, run one method on one option ``warmup + repeats`` times, measure."""
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    n, d, vocab = spec["tokens"], spec["hidden"], spec["vocab"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    # in place, so no temporary raises the peak before it is reset
    h = torch.empty(n, d, dtype=dtype).normal_(0.0, 1.0, generator=gen).to(device).requires_grad_()
    w = torch.empty(vocab, d, dtype=dtype).normal_(0.0, d**-0.5, generator=gen).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    ignored = torch.randperm(n, generator=gen)[: round(spec["ignored_fraction"] * n)]
    labels[ignored] = IGNORE_INDEX
    labels = labels.to(device)
    token_weights = None
    if "token_weights" in OPTIONS[spec["option"]]:
        token_weights = torch.rand(n, generator=gen).add_(0.5).to(device)
    fn = _loss_fn(spec["method"], spec["option"], h, w, labels, token_weights)
    result = {k: spec[k] for k in ("method", "option", "ignored_fraction")}
    if fn is None:
        return {**result, "supported": False}
    # warm the libraries up on a tiny problem, outside the measurement
    small = _loss_fn(
        spec["method"],
        spec["option"],
        h[:8].detach().requires_grad_(),
        w[:64].detach().requires_grad_(),
        labels[:8].clamp(max=63),
        token_weights[:8] if token_weights is not None else None,
    )
    assert small is not None  # (the same method and option as fn)
    small().backward()  # type: ignore[no-untyped-call]

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    else:
        reset = reset_peak_rss()
        base = rss_mb("VmRSS")
    times, cpu_times = [], []
    load_before = os.getloadavg()[0]
    for i in range(spec["warmup"] + spec["repeats"]):
        h.grad = w.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        fn().backward()  # type: ignore[no-untyped-call]
        if cuda:
            torch.cuda.synchronize()
        t1, c1 = time.perf_counter(), time.process_time()
        if i >= spec["warmup"]:
            times.append(t1 - t0)
            cpu_times.append(c1 - c0)
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    else:
        peak = rss_mb("VmHWM")
        peak_mb = peak - base if (peak is not None and base is not None and reset) else float("nan")
    return {
        **result,
        "supported": True,
        "time_s": statistics.median(times),
        "times_s": times,
        "cpu_s": statistics.median(cpu_times),
        "peak_mb": peak_mb,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
    }


# --- the driver ---------------------------------------------------------------------------------


def _run_in_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "losslab.losses.bench", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**_case_key(spec), "supported": True, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**_case_key(spec), "supported": True, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _case_key(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec[k] for k in ("method", "option", "ignored_fraction")}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return None
    return a / b


def compare(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Ratios of each row against the same run's plain / torch_chunked (same option, same
    fraction), and the acceptance checks of the fused head."""
    ok = {
        (r["method"], r["option"], r["ignored_fraction"]): r for r in results if r.get("supported") and "error" not in r
    }

    def get(method: str, option: str, frac: float, field: str) -> Any:
        r = ok.get((method, option, frac))
        return r[field] if r else None

    rows = []
    for r in results:
        row = dict(r)
        if r in ok.values():
            key = (r["option"], r["ignored_fraction"])
            for base in ("plain", "torch_chunked"):
                row[f"time_vs_{base}"] = _ratio(r["time_s"], get(base, *key, "time_s"))
                row[f"memory_vs_{base}"] = _ratio(r["peak_mb"], get(base, *key, "peak_mb"))
        rows.append(row)

    checks = []

    def check(name: str, where: str, value: float | None, target: float) -> None:
        checks.append(
            {
                "target": name,
                "where": where,
                "value": value,
                "limit": target,
                "met": None if value is None else value <= target,
            }
        )

    fractions = sorted({r["ignored_fraction"] for r in results})
    for row in rows:
        if row["method"] != "losslab" or row.get("time_s") is None:
            continue
        where = f"{row['option']}, ignored {row['ignored_fraction']:g}"
        check("memory_vs_plain", where, row.get("memory_vs_plain"), TARGETS["memory_vs_plain"])
        if row.get("memory_vs_torch_chunked") is not None:
            check("memory_vs_torch_chunked", where, row["memory_vs_torch_chunked"], TARGETS["memory_vs_torch_chunked"])
        if row["ignored_fraction"] == 0:
            check("time_vs_plain", where, row.get("time_vs_plain"), TARGETS["time_vs_plain"])
            if row.get("time_vs_torch_chunked") is not None:
                check("time_vs_torch_chunked", where, row["time_vs_torch_chunked"], TARGETS["time_vs_torch_chunked"])
    if 0 in fractions:
        for frac in (f for f in fractions if f > 0):
            for option in OPTIONS:
                value = _ratio(get("losslab", option, frac, "time_s"), get("losslab", option, 0, "time_s"))
                if value is not None and frac >= 0.5:
                    check(
                        "half_ignored_vs_all_valid",
                        f"{option}, ignored {frac:g} vs 0",
                        value,
                        TARGETS["half_ignored_vs_all_valid"],
                    )
    for frac in fractions:
        for option in (o for o in OPTIONS if o != "plain"):
            where = f"{option} vs plain, ignored {frac:g}"
            t = _ratio(get("losslab", option, frac, "time_s"), get("losslab", "plain", frac, "time_s"))
            m = _ratio(get("losslab", option, frac, "peak_mb"), get("losslab", "plain", frac, "peak_mb"))
            if t is not None:
                check("option_time_cost", where, t, TARGETS["option_time_cost"])
            if m is not None:
                check("option_memory_cost", where, m, TARGETS["option_memory_cost"])
    return rows, checks


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        (
            f"losslab bench loss-head: N={c['tokens']} d={c['hidden']} V={c['vocab']} {c['dtype']} on {c['device']} "
            f"({c['threads']} threads), median of {c['repeats']} after {c['warmup']} warm-up"
        ),
        "",
        (
            f"{'option':<16}{'ignored':>8}  {'method':<14}{'time s':>8}{'cpu s':>8}{'x plain':>9}{'x torch':>9}"
            f"{'peak MB':>9}{'x plain':>9}{'x torch':>9}"
        ),
    ]
    for r in report["results"]:
        head = f"{r['option']:<16}{r['ignored_fraction']:>8.2f}  {r['method']:<14}"
        if not r.get("supported"):
            lines.append(head + "   n/a (no such option in this method)")
        elif "error" in r:
            lines.append(head + f"   error: {r['error']}")
        else:
            lines.append(
                head + f"{r['time_s']:>8.2f}{r['cpu_s']:>8.2f}{_fmt(r.get('time_vs_plain')):>9}"
                f"{_fmt(r.get('time_vs_torch_chunked')):>9}{r['peak_mb']:>9.0f}{_fmt(r.get('memory_vs_plain')):>9}"
                f"{_fmt(r.get('memory_vs_torch_chunked')):>9}"
            )
    lines += ["", "acceptance (losslab):"]
    for chk in report["acceptance"]:
        mark = {True: "met ", False: "MISS", None: "?   "}[chk["met"]]
        lines.append(
            f"  {mark} {chk['target']:<26} {_fmt(chk['value'], '.3f'):>6} <= {chk['limit']:<5g} {chk['where']}"
        )
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """One row per (option, ignored fraction): each method's time and peak, losslab's ratios."""
    c = report["config"]
    by_key = {(r["method"], r["option"], r["ignored_fraction"]): r for r in report["results"]}
    methods = [m for m in METHODS if any(r["method"] == m for r in report["results"]) and m != "losslab"]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None or not r.get("supported"):
            return "n/a"
        if "error" in r:
            return "error"
        return f"{r['time_s']:.2f} s, {r['peak_mb']:,.0f} MB"

    head = ["option", "ignored", *methods, "losslab", *(f"losslab / {m} (time, memory)" for m in methods)]
    lines = [
        (
            f"### N={c['tokens']}, d={c['hidden']}, V={c['vocab']}, {c['dtype']}, {c['device']} "
            f"({c['threads']} threads), median of {c['repeats']} after {c['warmup']} warm-up"
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    keys = sorted(
        {(r["ignored_fraction"], r["option"]) for r in report["results"]},
        key=lambda k: (k[0], list(OPTIONS).index(k[1])),
    )
    for frac, option in keys:
        ours = by_key.get(("losslab", option, frac), {})
        ratios = [
            f"{_fmt(ours.get(f'time_vs_{m}'))} / {_fmt(ours.get(f'memory_vs_{m}'))}"
            if ours.get(f"time_vs_{m}") is not None
            else "-"
            for m in methods
        ]
        row = [
            option,
            f"{frac:g}",
            *(cell(by_key.get((m, option, frac))) for m in methods),
            cell(ours or None),
            *ratios,
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| target | where | value | limit | met |", "|---|---|---|---|---|"]
    for chk in report["acceptance"]:
        met = {True: "yes", False: "**no**", None: "?"}[chk["met"]]
        lines.append(f"| {chk['target']} | {chk['where']} | {_fmt(chk['value'], '.3f')} | {chk['limit']:g} | {met} |")
    return "\n".join(lines)


def bench_loss_head(
    *,
    tokens: int = 4096,
    hidden: int = 576,
    vocab: int = 49152,
    ignored_fractions: tuple[float, ...] = (0.0, 0.5),
    options: tuple[str, ...] = tuple(OPTIONS),
    methods: tuple[str, ...] = ("plain", "torch_chunked", "losslab"),
    repeats: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    timeout: float = 3600.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every (option, ignored fraction, method) case in its own subprocess; return the report."""
    results = []
    for frac in ignored_fractions:
        for option in options:
            for method in methods:
                spec = {
                    "tokens": tokens,
                    "hidden": hidden,
                    "vocab": vocab,
                    "ignored_fraction": frac,
                    "option": option,
                    "method": method,
                    "repeats": repeats,
                    "warmup": warmup,
                    "device": device,
                    "dtype": dtype,
                }
                result = _run_in_subprocess(spec, timeout)
                results.append(result)
                if progress:
                    progress(
                        f"{option} ignored={frac:g} {method}: "
                        + (
                            f"{result['time_s']:.2f} s, {result['peak_mb']:.0f} MB"
                            if "time_s" in result
                            else result.get("error", "n/a")
                        )
                    )
    rows, checks = compare(results)
    config = {
        "tokens": tokens,
        "hidden": hidden,
        "vocab": vocab,
        "dtype": dtype,
        "device": device,
        "repeats": repeats,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    return {"config": config, "results": rows, "acceptance": checks}


def run_bench_loss_head(args: argparse.Namespace) -> int:
    """CLI handler of ``losslab bench loss-head``."""
    from losslab.errors import UserError

    fractions = sorted({0.0, float(args.ignored_fraction)})  # the all-valid case is the reference
    options = tuple(getattr(args, "options", None) or OPTIONS)
    methods = tuple(getattr(args, "methods", None) or ("plain", "torch_chunked", "losslab"))
    for name in options:
        if name not in OPTIONS:
            raise UserError(f"--options: unknown option {name!r}; choose from {', '.join(OPTIONS)}")
    for name in methods:
        if name not in METHODS:
            raise UserError(f"--methods: unknown method {name!r}; choose from {', '.join(METHODS)}")
    if any(not 0 <= f < 1 for f in fractions):
        raise UserError("--ignored-fraction: each value must be in [0, 1)")
    for name in ("tokens", "hidden", "vocab", "repeats"):  # also checked by the CLI's option types
        if getattr(args, name) < 1:
            raise UserError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if getattr(args, "warmup", 1) < 0:
        raise UserError(f"--warmup: must be >= 0, got {args.warmup}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    check_memory(args.tokens, args.hidden, args.vocab, methods, args.device, args.dtype)
    report = bench_loss_head(
        tokens=args.tokens,
        hidden=args.hidden,
        vocab=args.vocab,
        ignored_fractions=tuple(fractions),
        options=options,
        methods=methods,
        repeats=args.repeats,
        warmup=getattr(args, "warmup", 1),
        device=args.device,
        dtype=args.dtype,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    failed = [r for r in report["results"] if r.get("error")]
    if failed:
        print(f"losslab bench: {len(failed)} of {len(report['results'])} cases failed (see the table)", file=sys.stderr)
        return 1
    return 0


def check_memory(tokens: int, hidden: int, vocab: int, methods: tuple[str, ...], device: str, dtype: str) -> None:
    """``UserError`` naming the options when one case's inputs (and the plain method's N x V logits,
    with their gradients) cannot fit in the device's memory."""
    from losslab.errors import UserError

    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    need = 2 * (tokens + vocab) * hidden * size  # h and W with their gradients
    if "plain" in methods:
        need += 2 * tokens * vocab * size
    if device.startswith("cuda"):
        have = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise UserError(
            f"--tokens {tokens} --hidden {hidden} --vocab {vocab}: one case needs about {need / 2**30:.1f} GiB"
            f"{' (the plain method holds the N x V logits and their gradient)' if 'plain' in methods else ''}, "
            f"more than the {have / 2**30:.1f} GiB of {device}; choose smaller sizes"
        )


if __name__ == "__main__":  # worker: one case, the result as one JSON line
    print(json.dumps(run_case(json.loads(sys.argv[1]))), flush=True)
