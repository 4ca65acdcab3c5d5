"""Fused distillation heads vs the plain two-logits path: peak extra memory and time, ratios
within one run; writes benchmarks/results/distillation_<device>.{json,md}.

    .venv/bin/python benchmarks/bench_distillation.py                       # N=4096 d=576 V=49152
    .venv/bin/python benchmarks/bench_distillation.py --tokens 256 --vocab 4096 --repeats 1   # a quick check

Per divergence (and top-k from a cached teacher), each method runs in its own subprocess on
the same inputs: the student's hidden states (N, d) and LM head (V, d) requiring grad, the
teacher's (N, dt) and (V, dt) frozen. ``plain``: ``distillation_loss(h @ W.T, h_t @ W_t.T,
...)`` (both N x V logits, teacher's under no_grad), backward; ``fused``:
``fused_linear_distillation(h, W, h_t, W_t, ...)``, backward. Peak extra memory is the
peak RSS (VmHWM, reset before the first run; blocks >= 1 MB mmapped, so freed memory leaves
the RSS) minus the RSS after building the inputs; time is
the median wall time of forward + backward over ``--repeats`` runs after one warm-up.
Goals (issue 20): fused / plain peak <= 0.2, time <= 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from losslab.losses import TeacherTopK, distillation_loss, fused_linear_distillation
from losslab.losses.bench import reset_peak_rss, rss_mb

CASES = {  # name -> distillation options ("cached": the teacher as a top-k of k ids)
    "forward_kl": {"divergence": "forward_kl"},
    "reverse_kl": {"divergence": "reverse_kl"},
    "jsd": {"divergence": "jsd", "beta": 0.5},
    "tvd": {"divergence": "tvd"},
    "forward_kl_top64_cached": {"divergence": "forward_kl", "cached": 64},
}
METHODS = ("plain", "fused")
GOALS = {"peak": 0.2, "time": 1.0}


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One method on one case, in this process: ``warmup + repeats`` forward + backward."""
    torch.manual_seed(0)
    n, d, dt, vocab = spec["tokens"], spec["hidden"], spec["teacher_hidden"], spec["vocab"]
    gen = torch.Generator().manual_seed(0)
    h = torch.empty(n, d).normal_(0.0, 1.0, generator=gen).requires_grad_()
    w = torch.empty(vocab, d).normal_(0.0, d**-0.5, generator=gen).requires_grad_()
    ht = torch.empty(n, dt).normal_(0.0, 1.0, generator=gen)
    wt = torch.empty(vocab, dt).normal_(0.0, 1.5 * dt**-0.5, generator=gen)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.randperm(n, generator=gen)[: round(spec["ignored_fraction"] * n)]] = -100
    options = dict(CASES[spec["case"]])
    k = options.pop("cached", None)
    cache = None
    if k is not None:  # the cache is data on disk in a real run: built before the measurement
        with torch.no_grad():
            chunks = [torch.topk(ht[i : i + 512] @ wt.T, k, dim=-1) for i in range(0, n, 512)]
        cache = TeacherTopK(torch.cat([c.values for c in chunks]), torch.cat([c.indices for c in chunks]))

    def plain() -> torch.Tensor:
        if cache is not None:
            return distillation_loss(h @ w.T, None, labels, teacher_topk=cache, **options)
        with torch.no_grad():
            teacher = ht @ wt.T
        return distillation_loss(h @ w.T, teacher, labels, **options)

    def fused() -> torch.Tensor:
        if cache is not None:
            return fused_linear_distillation(h, w, labels=labels, teacher_topk=cache, **options)
        return fused_linear_distillation(h, w, ht, wt, labels, **options)

    fn = plain if spec["method"] == "plain" else fused
    reset = reset_peak_rss()
    base = rss_mb("VmRSS")
    times, losses = [], []
    for i in range(1 + spec["repeats"]):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()  # type: ignore[no-untyped-call]
        if i >= 1:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    peak = rss_mb("VmHWM")
    return {
        "case": spec["case"],
        "method": spec["method"],
        "time_s": statistics.median(times),
        "times_s": times,
        "peak_mb": peak - base if (peak is not None and base is not None and reset) else None,
        "loss": losses[-1],
        "loadavg_before": spec.get("loadavg"),
    }


def run_in_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--case-json", json.dumps(spec)]
    # blocks of 1 MB and more are mmapped and handed back when freed: glibc's dynamic threshold
    # would otherwise keep freed blocks of up to 32 MB (a chunk's logits) in the heap, and the
    # peak RSS would count memory the process no longer uses
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"case": spec["case"], "method": spec["method"], "error": f"exit {proc.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for case in dict.fromkeys(r["case"] for r in results):
        by = {r["method"]: r for r in results if r["case"] == case and "error" not in r}
        if set(by) != set(METHODS):
            continue
        p, f = by["plain"], by["fused"]
        peak = f["peak_mb"] / p["peak_mb"] if f["peak_mb"] is not None and p["peak_mb"] else None
        rows.append(
            {
                "case": case,
                "plain_peak_mb": p["peak_mb"],
                "fused_peak_mb": f["peak_mb"],
                "peak_ratio": peak,
                "plain_time_s": p["time_s"],
                "fused_time_s": f["time_s"],
                "time_ratio": f["time_s"] / p["time_s"],
                "loss_rel_diff": abs(f["loss"] - p["loss"]) / max(abs(p["loss"]), 1e-12),
            }
        )
    return rows


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    s = report["setup"]
    lines = [
        "# Distillation heads: fused vs plain two-logits path",
        "",
        (
            f"N={s['tokens']} d={s['hidden']} teacher d={s['teacher_hidden']} V={s['vocab']}, ignored fraction "
            f"{s['ignored_fraction']}, float32, {s['device']}, {s['threads']} threads, median of {s['repeats']} "
            f"forward + backward after 1 warm-up, each method in its own process. Command: `{s['command']}`."
        ),
        f"Goals: fused / plain peak extra memory <= {GOALS['peak']}, time <= {GOALS['time']}.",
        "",
        "| case | plain peak MB | fused peak MB | peak ratio | plain s | fused s | time ratio | loss rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["ratios"]:
        lines.append(
            f"| {r['case']} | {fmt(r['plain_peak_mb'], '.0f')} | {fmt(r['fused_peak_mb'], '.0f')} | "
            f"{fmt(r['peak_ratio'], '.3f')} | {r['plain_time_s']:.3f} | {r['fused_time_s']:.3f} | "
            f"{r['time_ratio']:.3f} | {r['loss_rel_diff']:.1e} |"
        )
    errors = [r for r in report["results"] if "error" in r]
    lines += ["", *[f"- {r['case']} / {r['method']}: {r['error']}" for r in errors]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--teacher-hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--ignored-fraction", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--out-name", default="distillation_cpu")
    parser.add_argument("--case-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case_json:
        print(json.dumps(run_case(json.loads(args.case_json))))
        return 0
    setup = {
        "tokens": args.tokens,
        "hidden": args.hidden,
        "teacher_hidden": args.teacher_hidden,
        "vocab": args.vocab,
        "ignored_fraction": args.ignored_fraction,
        "repeats": args.repeats,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "command": "python benchmarks/bench_distillation.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    results = []
    for case in args.cases:
        for method in METHODS:
            spec = {**setup, "case": case, "method": method, "loadavg": os.getloadavg()[0]}
            result = run_in_subprocess(spec, args.timeout)
            print(json.dumps(result), file=sys.stderr, flush=True)
            results.append(result)
    report = {"setup": setup, "results": results, "ratios": ratios(results)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.out_name}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.out_dir / f"{args.out_name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
