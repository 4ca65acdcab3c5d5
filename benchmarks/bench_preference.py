"""Preference-training benchmarks; prints a table and writes benchmarks/results/preference_<device>.{json,md}.

    .venv/bin/python benchmarks/bench_preference.py                  # both parts, a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_preference.py --part logps     # (a) only
    .venv/bin/python benchmarks/bench_preference.py --part sharing   # (b) only
    .venv/bin/python benchmarks/bench_preference.py --part reference # (c) only

(a) ``logps``: per-sequence completion log-probs at SmolLM2-135M's head shape (V=49152, d=576),
    ``--pairs`` pairs x 2 completions x ``--completion`` tokens, forward + backward of a DPO-style
    loss on the sums (``-logsigmoid(0.1 (chosen - rejected))``, so the upstream gradient differs
    per sequence): ``fused`` = :func:`losslab.losses.fused_sequence_logps` on the hidden states,
    ``plain`` = ``sequence_logps(hidden @ W.T)`` on the full logits. Each method runs in its own
    subprocess; peak extra memory = peak RSS (``VmHWM``, reset after the inputs are built) minus
    the RSS then, as in benchmarks/bench_loss_head.py. Goals: fused <= 0.25x plain's memory and
    <= 1.0x its time.
(b) ``sharing``: the real ``builtin:smollm2-135m-instruct`` (float32, sdpa, train mode), prompts of
    ``--prompt`` tokens and completions of ``--sharing-completion`` tokens (4x shorter), one
    optimizer-free training step (forward + backward through the model and the fused head) on
    ``--sharing-pairs`` pairs: ``concat`` (2B rows prompt+chosen / prompt+rejected) vs ``shared``
    (B rows, prompt once, 4D mask). Throughput = pairs per second (so "tokens/s" counts each
    pair's logical tokens once for both layouts); the two layouts alternate in one process.
    Goal: shared >= 1.3x concat.

(c) ``reference``: one DPO (sigmoid) training step of the real ``preference`` task (its collator,
    forward, loss adapter; backward and an AdamW step) on ``builtin:smollm2-135m-instruct`` and
    ``builtin:preference`` pairs (``--reference-batch`` pairs, shared layout), with the reference
    log-probs from a frozen copy run each step (``preference.reference: model``) vs read from the
    cache (``cache``); the two alternate in one process on the same batches. The cache's one-off
    precompute is timed too (and the steps after which it has paid for itself). Goal: cached
    <= 0.8x the on-the-fly step time.

Times are medians of ``--repeats`` timed runs after ``--warmup`` untimed ones, with the process
CPU time beside them as a contention check (on a machine shared with other processes, wall time
well above CPU time / threads means the run waited for a core).
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
import torch.nn.functional as F

from losslab.losses.bench import reset_peak_rss, rss_mb

GOALS = {"logps_memory": 0.25, "logps_time": 1.0, "sharing_speedup": 1.3, "reference_time": 0.8}


def _timed(step: Any, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    times, cpu = [], []
    for i in range(warmup + repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        t1, c1 = time.perf_counter(), time.process_time()
        if i >= warmup:
            times.append(t1 - t0)
            cpu.append(c1 - c0)
    return times, cpu


# ---- (a) log-probs: one method, inside a worker process -----------------------------------------


def logps_case(spec: dict[str, Any]) -> dict[str, Any]:
    from losslab.losses.logprobs import fused_sequence_logps, sequence_logps

    torch.set_num_threads(spec["threads"])
    b, n, d, vocab = spec["pairs"], spec["completion"], spec["hidden"], spec["vocab"]
    m = 2 * b * n
    gen = torch.Generator().manual_seed(0)
    h = torch.empty(m, d).normal_(0.0, 1.0, generator=gen).requires_grad_()
    w = torch.empty(vocab, d).normal_(0.0, d**-0.5, generator=gen).requires_grad_()
    targets = torch.randint(0, vocab, (m,), generator=gen)
    segments = torch.arange(2 * b).repeat_interleave(n)  # chosen 0..B-1, rejected B..2B-1

    def loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, s: torch.Tensor, k: int) -> torch.Tensor:
        if spec["method"] == "fused":
            sums, _ = fused_sequence_logps(h, w, t, s, 2 * k)
        else:
            sums, _ = sequence_logps(h @ w.T, t, s, 2 * k)
        return -F.logsigmoid(0.1 * (sums[:k] - sums[k:])).mean()

    small = loss(
        h[:8].detach().requires_grad_(), w[:64].detach().requires_grad_(), targets[:8] % 64, segments[:8] % 2, 1
    )
    small.backward()  # warm the libraries up outside the measurement
    reset = reset_peak_rss()
    base = rss_mb("VmRSS")

    def step() -> None:
        h.grad = w.grad = None
        loss(h, w, targets, segments, b).backward()

    load = os.getloadavg()[0]
    times, cpu = _timed(step, spec["warmup"], spec["repeats"])
    peak = rss_mb("VmHWM")
    return {
        "method": spec["method"],
        "time_s": statistics.median(times),
        "times_s": times,
        "cpu_s": statistics.median(cpu),
        "peak_mb": peak - base if (peak is not None and base is not None and reset) else float("nan"),
        "loadavg_before": load,
    }


def bench_logps(args: argparse.Namespace) -> dict[str, Any]:
    rows = {}
    for method in ("plain", "fused"):
        spec = {
            "method": method,
            "pairs": args.pairs,
            "completion": args.completion,
            "hidden": 576,
            "vocab": 49152,
            "threads": args.threads,
            "warmup": args.warmup,
            "repeats": args.repeats,
        }
        cmd = [sys.executable, __file__, "--case", json.dumps(spec)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{method} failed: {proc.stderr.strip()[-800:]}")
        rows[method] = json.loads(lines[-1])
        print(f"  logps {method}: {rows[method]['time_s']:.2f} s, {rows[method]['peak_mb']:.0f} MB", file=sys.stderr)
    plain, fused = rows["plain"], rows["fused"]
    return {
        "shape": {"pairs": args.pairs, "completion": args.completion, "rows": 2 * args.pairs * args.completion},
        "shape_model": "V=49152, d=576 (SmolLM2-135M)",
        "results": rows,
        "time_ratio": fused["time_s"] / plain["time_s"],
        "memory_ratio": fused["peak_mb"] / plain["peak_mb"],
    }


# ---- (b) prefix sharing on the real model ------------------------------------------------------


def bench_sharing(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from losslab.models import load_model
    from losslab.train.tasks.pair_rows import batch_sequence_logps, pair_batch

    torch.set_num_threads(args.threads)
    model = load_model(AutoModelForCausalLM, "builtin:smollm2-135m-instruct", attn_implementation="sdpa")
    model.train()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def ids(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=gen).tolist()

    b = args.sharing_pairs
    pairs = [
        {"prompt": ids(args.prompt), "chosen": ids(args.sharing_completion), "rejected": ids(args.sharing_completion)}
        for _ in range(b)
    ]
    batches = {layout: pair_batch(pairs, layout=layout, pad_id=0) for layout in ("concat", "shared")}

    def step(layout: str) -> None:
        model.zero_grad(set_to_none=True)
        sums, _ = batch_sequence_logps(model, batches[layout])
        (-F.logsigmoid(0.1 * (sums[:b] - sums[b:])).mean()).backward()

    results: dict[str, dict[str, list[float]]] = {k: {"times_s": [], "cpu_s": []} for k in batches}
    load = os.getloadavg()[0]
    for layout in batches:  # warm-up, untimed
        for _ in range(args.warmup):
            step(layout)
    for _ in range(args.repeats):  # alternate, so contention hits both alike
        for layout in batches:
            times, cpu = _timed(lambda layout=layout: step(layout), 0, 1)
            results[layout]["times_s"] += times
            results[layout]["cpu_s"] += cpu
    out: dict[str, Any] = {
        "shape": {"pairs": b, "prompt": args.prompt, "completion": args.sharing_completion},
        "loadavg_before": load,
    }
    for layout, r in results.items():
        t = statistics.median(r["times_s"])
        tokens = b * (2 * args.prompt + 2 * args.sharing_completion)  # logical tokens of the step
        out[layout] = {
            "time_s": t,
            "times_s": r["times_s"],
            "cpu_s": statistics.median(r["cpu_s"]),
            "row_tokens": int(batches[layout]["input_ids"].numel()),
            "pairs_per_s": b / t,
            "tokens_per_s": tokens / t,
        }
        print(f"  sharing {layout}: {t:.2f} s/step, {b / t:.3f} pairs/s", file=sys.stderr)
    out["speedup"] = out["shared"]["pairs_per_s"] / out["concat"]["pairs_per_s"]
    return out


# ---- (c) cached vs on-the-fly reference -----------------------------------------------------------


def bench_reference(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from losslab.train.config import TrainConfig
    from losslab.train.run import loss_adapter
    from losslab.train.task import get_task, plan_loss

    torch.set_num_threads(args.threads)
    b = args.reference_batch
    out_dir = tempfile.mkdtemp(prefix="bench-reference-")
    cache_root = tempfile.mkdtemp(prefix="bench-reference-cache-")

    def build(mode: str) -> tuple[Any, Any, list[dict[str, Any]], float]:
        config = TrainConfig.model_validate(
            {
                "task": "preference",
                "model": "builtin:smollm2-135m-instruct",
                "output_dir": f"{out_dir}/{mode}",
                "data": {"train": "builtin:preference", "max_length": 96, "max_train_samples": b * 4},
                "loss": {"terms": [{"name": "preference", "loss_type": "sigmoid", "beta": 0.1}]},
                "preference": {"reference": mode, "layout": "shared"},
                "training": {"batch_size": b, "lr": 1e-6},
                "eval": {"splits": []},
            }
        )
        plan = plan_loss(config)
        start = time.perf_counter()
        run = get_task("preference").build(config, plan)
        built = time.perf_counter() - start
        adapter = loss_adapter(run, plan, total_steps=100)
        batches = [run.collator(run.train[i : i + b]) for i in range(0, len(run.train), b)]
        return run, adapter, batches, built

    from losslab.train import reference

    original = reference.reference_cache
    reference.reference_cache = lambda: Path(cache_root)  # a cold cache: the precompute is timed
    try:
        runs = {mode: build(mode) for mode in ("model", "cache")}
    finally:
        reference.reference_cache = original
    optimizers = {mode: torch.optim.AdamW(r[0].model.parameters(), lr=1e-6) for mode, r in runs.items()}

    def step(mode: str, i: int) -> None:
        run, adapter, batches, _ = runs[mode]
        run.model.train()
        loss = adapter.compute_loss(run.model, batches[i % len(batches)], None)
        loss.backward()
        optimizers[mode].step()
        optimizers[mode].zero_grad(set_to_none=True)

    results: dict[str, dict[str, list[float]]] = {m: {"times_s": [], "cpu_s": []} for m in runs}
    load = os.getloadavg()[0]
    for mode in runs:
        for i in range(args.warmup):
            step(mode, i)
    for i in range(args.repeats):  # alternate, so contention hits both alike
        for mode in runs:
            times, cpu = _timed(lambda mode=mode, i=i: step(mode, i), 0, 1)
            results[mode]["times_s"] += times
            results[mode]["cpu_s"] += cpu
    out: dict[str, Any] = {"pairs": b, "loadavg_before": load}
    for mode, r in results.items():
        out[mode] = {
            "time_s": statistics.median(r["times_s"]),
            "times_s": r["times_s"],
            "cpu_s": statistics.median(r["cpu_s"]),
        }
        print(f"  reference {mode}: {out[mode]['time_s']:.2f} s/step", file=sys.stderr)
    out["ratio"] = out["cache"]["time_s"] / out["model"]["time_s"]
    # the build with a cold cache includes the precompute; the on-the-fly build loads the frozen copy instead
    out["precompute_s"] = runs["cache"][3]
    out["build_model_s"] = runs["model"][3]
    saved = out["model"]["time_s"] - out["cache"]["time_s"]
    out["break_even_steps"] = (out["precompute_s"] - out["build_model_s"]) / saved if saved > 0 else None
    return out


# ---- report ------------------------------------------------------------------------------------


def _verdict(value: float, goal: float, lower_is_better: bool) -> str:
    met = value <= goal if lower_is_better else value >= goal
    return f"{'met' if met else 'MISSED'} (goal {'<=' if lower_is_better else '>='} {goal}x)"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Preference benchmarks (cpu)",
        "",
        (
            f"Command: `{report['command']}` ({report['when']}, {os.cpu_count()} CPUs, {report['threads']} threads; "
            f"load average {report['loadavg']:.2f} before the run)."
        ),
        "",
    ]
    if report["loadavg"] > 0.5:
        lines += [
            (
                f"Other processes were using the CPUs (load average {report['loadavg']:.2f}): times and ratios are "
                "indicative only; rerun on an idle machine for the README."
            ),
            "",
        ]
    a = report.get("logps")
    if a:
        s = a["shape"]
        lines += [
            (
                f"## (a) Sequence log-probs, {a['shape_model']}, {s['pairs']} pairs x 2 x {s['completion']} tokens "
                f"({s['rows']} rows), forward + backward"
            ),
            "",
            "| method | time (median) | process CPU time | peak extra memory |",
            "|---|---:|---:|---:|",
        ]
        for name, label in (("plain", "full logits + sequence_logps"), ("fused", "fused_sequence_logps")):
            r = a["results"][name]
            lines.append(f"| {label} | {r['time_s']:.2f} s | {r['cpu_s']:.2f} s | {r['peak_mb']:,.0f} MB |")
        lines += [
            "",
            (
                f"fused / plain: time {a['time_ratio']:.2f}x {_verdict(a['time_ratio'], GOALS['logps_time'], True)}, "
                f"memory {a['memory_ratio']:.2f}x {_verdict(a['memory_ratio'], GOALS['logps_memory'], True)}."
            ),
            "",
        ]
    b = report.get("sharing")
    if b:
        s = b["shape"]
        lines += [
            (
                f"## (b) Prefix sharing, builtin:smollm2-135m-instruct, {s['pairs']} pairs, prompt {s['prompt']}, "
                f"completions {s['completion']}, forward + backward"
            ),
            "",
            "| layout | rows x T | time per step (median) | process CPU time | pairs/s | logical tokens/s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for layout in ("concat", "shared"):
            r = b[layout]
            lines.append(
                f"| {layout} | {r['row_tokens']:,} tokens | {r['time_s']:.2f} s | {r['cpu_s']:.2f} s | "
                f"{r['pairs_per_s']:.3f} | {r['tokens_per_s']:.0f} |"
            )
        lines += [
            "",
            f"shared / concat throughput: {b['speedup']:.2f}x {_verdict(b['speedup'], GOALS['sharing_speedup'], False)}.",
            "",
        ]
    c = report.get("reference")
    if c:
        lines += [
            (
                f"## (c) Reference log-probs, builtin:smollm2-135m-instruct, DPO step of the preference task, "
                f"{c['pairs']} pairs (forward + backward + AdamW)"
            ),
            "",
            "| reference | time per step (median) | process CPU time |",
            "|---|---:|---:|",
        ]
        for mode, label in (("model", "frozen copy, on the fly"), ("cache", "precomputed, cached")):
            lines.append(f"| {label} | {c[mode]['time_s']:.2f} s | {c[mode]['cpu_s']:.2f} s |")
        even = c["break_even_steps"]
        lines += [
            "",
            f"cached / on the fly: {c['ratio']:.2f}x {_verdict(c['ratio'], GOALS['reference_time'], True)}. "
            f"Building the run with a cold cache (precompute of {4 * c['pairs']} pairs included) took "
            f"{c['precompute_s']:.1f} s vs {c['build_model_s']:.1f} s with the frozen copy"
            + (f": paid back after {even:.1f} steps." if even is not None else "."),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "logps", "sharing", "reference"], default="all")
    parser.add_argument("--pairs", type=int, default=4, help="(a) pairs")
    parser.add_argument("--completion", type=int, default=512, help="(a) tokens per completion")
    parser.add_argument("--sharing-pairs", type=int, default=2, help="(b) pairs")
    parser.add_argument("--prompt", type=int, default=256, help="(b) prompt tokens")
    parser.add_argument("--sharing-completion", type=int, default=64, help="(b) tokens per completion")
    parser.add_argument("--reference-batch", type=int, default=8, help="(c) pairs per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one (a) method in a worker
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(logps_case(json.loads(args.case))))
        return 0
    report: dict[str, Any] = {
        "command": (
            "python benchmarks/bench_preference.py " + " ".join(argv if argv is not None else sys.argv[1:])
        ).strip(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": args.threads,
        "loadavg": os.getloadavg()[0],
        "goals": GOALS,
    }
    if args.part in ("all", "logps"):
        report["logps"] = bench_logps(args)
    if args.part in ("all", "sharing"):
        report["sharing"] = bench_sharing(args)
    if args.part in ("all", "reference"):
        report["reference"] = bench_reference(args)
    text = markdown(report)
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / "preference_cpu"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
