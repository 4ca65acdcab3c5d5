"""How much the executors of ``losslab compare`` gain and cost on this machine; writes
benchmarks/results/scale_cpu.md (and .json).

    .venv/bin/python benchmarks/bench_scale.py                  # the demo study (8 runs), on a quiet machine
    .venv/bin/python benchmarks/bench_scale.py --quick          # 2 short runs: checks that it works

Measured, each as one ``losslab compare`` command in a fresh output folder (wall time of the
whole command: start-up, runs, statistics, report):

- ``sequential``: the runs one after the other, all cores per run (the default);
- ``processes x1`` / ``processes x2``: 1 and 2 worker processes (cores / workers threads per run);
  their ratio is the gain of running 2 runs at once;
- ``ray x1``: Ray (a local cluster started by the command), one run at a time on all cores: minus
  ``sequential`` and divided by the runs, Ray's overhead per run (with the cluster's start-up);
- ``ray no-op tasks``: run_jobs of trivial jobs on a running local cluster: the per-task overhead
  alone, without start-up.

It also says whether the per-run metrics are identical between the configurations (they are
when the thread count per run is the same; docs/scaling.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "compare_demo.yaml"
QUICK = ["--set", "seeds=[0]", "--set", "base.training.max_steps=4", "--set", "base.data.max_eval_samples=32"]
QUICK_VARIANTS = ["--set", "variants=[{name: cross_entropy, overrides: {loss.terms: [{name: cross_entropy}]}}, "
                  "{name: focal, overrides: {loss.terms: [{name: focal, gamma: 2.0}]}}]"]  # fmt: skip


def run_compare(out: Path, extra: list[str], quick: bool) -> dict:
    """One ``losslab compare`` of the demo study into ``out``; wall time and per-run metrics."""
    command = [sys.executable, "-m", "losslab.cli", "compare", str(DEMO), "--set", f"output_dir={out}", *extra]
    if quick:
        command += QUICK + QUICK_VARIANTS
    load = os.getloadavg()[0]
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("runs/*/metrics.json"))}
    return {"command": command[2:], "wall_s": wall, "loadavg_before": load, "metrics": metrics}


def ray_noop_overhead(tasks: int) -> dict:
    """Seconds per trivial task on a running local Ray cluster (one at a time, and all at once)."""
    import ray

    from losslab.compare.execution import Execution, Job, run_jobs

    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        jobs = [Job(f"noop {i}", functools.partial(int, 0)) for i in range(tasks)]
        run_jobs(jobs[:2], Execution(backend="ray"))  # warm the worker pool
        out = {}
        for name, workers in (("one_at_a_time", 1), ("all_at_once", None)):
            started = time.monotonic()
            run_jobs(jobs, Execution(backend="ray", workers=workers))
            out[f"{name}_s_per_task"] = (time.monotonic() - started) / tasks
        return out
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 short runs instead of the demo's 8 (a check)")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--noop-tasks", type=int, default=50)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    configs = {
        "sequential": [],
        "processes x1": ["--backend", "processes", "--workers", "1"],
        "processes x2": ["--backend", "processes", "--workers", "2"],
    }
    if not args.skip_ray:
        configs["ray x1"] = ["--backend", "ray", "--workers", "1", "--set", f"execution.resources_per_run.cpus={cores}"]
    measured = {}
    scratch = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        for name, extra in configs.items():
            print(f"== {name}", file=sys.stderr, flush=True)
            measured[name] = run_compare(scratch / name.replace(" ", "_"), extra, args.quick)
            print(f"   {measured[name]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    runs = len(measured["sequential"]["metrics"])
    noop = {} if args.skip_ray else ray_noop_overhead(args.noop_tasks)
    same = {name: m["metrics"] == measured["sequential"]["metrics"] for name, m in measured.items()}
    report = {
        "machine": {"cores": cores, "python": platform.python_version(), "platform": platform.platform()},
        "quick": args.quick,
        "runs": runs,
        "configs": {k: {kk: vv for kk, vv in v.items() if kk != "metrics"} for k, v in measured.items()},
        "ratio_processes_x1_over_x2": measured["processes x1"]["wall_s"] / measured["processes x2"]["wall_s"],
        "ray_overhead_s_per_run": (
            None
            if args.skip_ray
            else (measured["ray x1"]["wall_s"] - measured["sequential"]["wall_s"]) / max(runs, 1)
        ),
        "ray_noop": noop,
        "metrics_identical_to_sequential": same,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scale_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / "scale_cpu.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"# losslab compare executors on {r['machine']['cores']} cores"
        + (" (--quick: a check, not a measurement)" if r["quick"] else ""),
        "",
        f"The demo study (examples/compare_demo.yaml), {r['runs']} runs; wall time of the whole command.",
        "",
        "| executor | wall s | load avg before | per-run metrics = sequential |",
        "|---|---:|---:|---|",
    ]
    for name, c in r["configs"].items():
        lines.append(
            f"| {name} | {c['wall_s']:.1f} | {c['loadavg_before']:.2f} | {r['metrics_identical_to_sequential'][name]} |"
        )
    lines += ["", f"- 1 vs 2 worker processes: x1 / x2 wall time = {r['ratio_processes_x1_over_x2']:.2f}"]
    if r["ray_overhead_s_per_run"] is not None:
        lines.append(
            f"- Ray's overhead per run (ray x1 - sequential, / runs; includes the local cluster's start-up): "
            f"{r['ray_overhead_s_per_run']:.1f} s"
        )
    for key, value in r["ray_noop"].items():
        lines.append(f"- Ray no-op task, {key.replace('_', ' ')}: {value * 1000:.1f} ms")
    lines += [
        "",
        "Per-run metrics differ from sequential where the threads per run differ (cores / workers): "
        "a run's bits depend on its thread count (docs/scaling.md).",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_scale.py{' --quick' if r['quick'] else ''}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
