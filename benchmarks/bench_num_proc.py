"""Data preparation in several processes (``data.num_proc``): wall time of building the
causal-LM samples of a records file in one process (``build_samples``) and through
``datasets.map`` with N processes (``build_samples_parallel``, cold cache), then the second,
cached run. Checks that every run gives the same samples and statistics.

    .venv/bin/python benchmarks/bench_num_proc.py                         # builtin:chitchat train, N = 2
    .venv/bin/python benchmarks/bench_num_proc.py --num-proc 2 4 --limit 1000

The tokenizer and chat template are SmolLM2's (``--tokenizer``); the Rust tokenizer runs one
thread per process, so the speed-up is the processes'. Wall times on a shared machine are
upper bounds: the speed-up is only as good as the cores left free by other jobs.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from datasets.utils.logging import disable_progress_bar

from losslab.data.builtin import resolve_data_path
from losslab.masking import BuildStats, MaskConfig, build_samples
from losslab.masking.parallel import build_samples_parallel
from losslab.models import load_tokenizer


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (the map workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="builtin:chitchat", help="records file or builtin:NAME (its train split)")
    ap.add_argument("--tokenizer", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--num-proc", type=int, nargs="+", default=[2])
    ap.add_argument("--limit", type=int, default=None, help="only the first N records")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    disable_progress_bar()
    path = resolve_data_path(args.data, "train")
    tokenizer = load_tokenizer(args.tokenizer)
    config = MaskConfig(max_length=args.max_length)
    print(f"{path}: cpus available {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f}")

    stats = BuildStats()
    t, c = time.perf_counter(), cpu_seconds()
    want = build_samples(path, tokenizer, config, stats=stats, limit=args.limit)
    base, base_cpu = time.perf_counter() - t, cpu_seconds() - c
    print(
        f"num_proc=1 (build_samples): {base:.1f} s wall, {base_cpu:.1f} s CPU, {stats.records} records, {stats.summary()}"
    )
    out = {
        "data": str(path),
        "records": stats.records,
        "samples": stats.samples,
        "num_proc=1": base,
        "num_proc=1 cpu": base_cpu,
    }
    for n in args.num_proc:
        with tempfile.TemporaryDirectory() as cache:
            times, cpu = [], []
            for _ in ("cold", "cached"):
                got_stats = BuildStats()
                t, c = time.perf_counter(), cpu_seconds()
                got = build_samples_parallel(
                    path, tokenizer, config, num_proc=n, stats=got_stats, limit=args.limit, cache=Path(cache)
                )
                times.append(time.perf_counter() - t)
                cpu.append(cpu_seconds() - c)
                assert got == want and got_stats.summary() == stats.summary(), "different samples or statistics"
        print(
            f"num_proc={n}: {times[0]:.1f} s wall cold ({base / times[0]:.2f}x), {cpu[0]:.1f} s CPU in all processes; "
            f"{times[1]:.1f} s cached "
            f"({base / times[1]:.1f}x); same samples and statistics"
        )
        out[f"num_proc={n}"] = times[0]
        out[f"num_proc={n} cpu"] = cpu[0]
        out[f"num_proc={n} cached"] = times[1]
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
