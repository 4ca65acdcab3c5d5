"""Run the README's loss-head benchmark and write benchmarks/results/loss_head_<device>.{json,md}.

    .venv/bin/python benchmarks/bench_loss_head.py                 # N=4096 d=576, V=49152 and 151936
    .venv/bin/python benchmarks/bench_loss_head.py --vocab 49152 --rounds 1

Each vocabulary size is benchmarked ``--rounds`` times (every round is one complete
``losslab bench loss-head`` run: all methods, options and ignored fractions, each case in its
own subprocess). Ratios are only ever taken within one round. On a shared machine the round
with the lowest mean load average (the least contention from other processes) is reported;
every round is kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from losslab.losses.bench import OPTIONS, bench_loss_head, format_markdown, format_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--ignored-fraction", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--out-name", default=None, help="file stem under --out-dir (default loss_head_<device>)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    chosen, everything = [], []
    for vocab in args.vocab:
        rounds = []
        for i in range(args.rounds):
            print(f"== V={vocab}, round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
            report = bench_loss_head(
                tokens=args.tokens,
                hidden=args.hidden,
                vocab=vocab,
                ignored_fractions=(0.0, args.ignored_fraction),
                options=tuple(args.options),
                repeats=args.repeats,
                device=args.device,
                dtype=args.dtype,
                progress=lambda line: print("  " + line, file=sys.stderr, flush=True),
            )
            loads = [r["loadavg_before"] for r in report["results"] if "loadavg_before" in r]
            report["mean_loadavg"] = statistics.fmean(loads) if loads else None
            rounds.append(report)
            print(format_table(report), file=sys.stderr, flush=True)
        best = min(rounds, key=lambda r: r["mean_loadavg"] if r["mean_loadavg"] is not None else float("inf"))
        chosen.append(best)
        everything.append({"vocab": vocab, "rounds": rounds, "chosen_round": rounds.index(best)})

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / (args.out_name or f"loss_head_{args.device.split(':')[0]}")
    command = "python benchmarks/bench_loss_head.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stem.with_suffix(".json").write_text(json.dumps({"command": command.strip(), "runs": everything}, indent=1) + "\n")
    md = [
        f"# Loss-head benchmark ({args.device})",
        "",
        (
            f"Command: `{command.strip()}` "
            f"(machine: {os.cpu_count()} CPUs). Each table is the round with the least contention "
            f"(lowest mean load average) of {args.rounds}; ratios are within that round."
        ),
        "",
    ]
    for report in chosen:
        md += [format_markdown(report), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
