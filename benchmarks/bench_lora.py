"""LoRA vs full fine-tuning of SmolLM2-135M-Instruct: step time and peak memory; prints a table and
writes benchmarks/results/lora_<device>.{json,md}.

    .venv/bin/python benchmarks/bench_lora.py                       # 4 cases x 4 steps of 4 x 256 tokens: ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_lora.py --batch 2 --seq 64 --repeats 1 --out-name lora_check

One training step = the ``causal_lm`` task's real forward (fused loss head, token cross-entropy
through losslab's loss adapter), backward, and an AdamW step on the trainable parameters, on
``--batch`` rows of ``--seq`` random tokens (every token trained). Cases, each in its own
subprocess (so one case's freed memory never hides another's peak):

- ``full``: every weight trains (AdamW keeps two float32 moments per weight);
- ``lora``: adapters only (``--rank``, ``--targets``; base weights frozen, the fused head's
  frozen-weight path: no LM-head weight gradient);
- ``full+gc`` and ``lora+gc``: the same with ``training.gradient_checkpointing``.

Memory: ``peak_mb`` is the peak RSS (``VmHWM``, reset once the model is loaded) minus the RSS
then: what the steps add on top of the loaded weights (gradients, optimizer state, activations);
``rss_peak_mb`` is the process's whole peak. Times are medians of ``--repeats`` steps after
``--warmup`` untimed ones, with process CPU time beside them (wall time well above CPU time /
threads means the run waited for a core). Ratios are taken against ``full`` of the same run.
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

from losslab.losses.bench import reset_peak_rss, rss_mb

MODEL = "builtin:smollm2-135m-instruct"
CASES = ("full", "lora", "full+gc", "lora+gc")


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One case, in this process: build the model as ``losslab train`` does, time the steps."""
    from losslab.losses.registry import build_composite
    from losslab.models import load_causal_lm
    from losslab.train.config import LoraConfig
    from losslab.train.lora import enable_gradient_checkpointing, trainable_summary, with_lora
    from losslab.train.next_token import causal_lm_loss

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model: torch.nn.Module = load_causal_lm(MODEL, dtype="float32")
    if spec["case"].startswith("lora"):
        model = with_lora(model, LoraConfig(r=spec["rank"], alpha=2 * spec["rank"], target_modules=spec["targets"]))
    if spec["case"].endswith("+gc"):
        enable_gradient_checkpointing(model)
    model.train()
    composite = build_composite([{"name": "token_cross_entropy"}], total_steps=1)
    loss_fn = causal_lm_loss(composite, model=model, fused=True)  # type: ignore[arg-type]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.get_output_embeddings().weight.shape[0])  # type: ignore[operator,union-attr]
    ids = torch.randint(10, vocab, (spec["batch"], spec["seq"]), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn.compute_loss(model, dict(batch))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    with torch.no_grad():  # page every weight in (a loaded checkpoint may be mapped lazily), outside the measurement
        for p in model.parameters():
            p.sum()
    reset = reset_peak_rss()
    base = rss_mb("VmRSS")
    load = os.getloadavg()[0]
    times, cpu, losses = [], [], []
    for i in range(spec["warmup"] + spec["repeats"]):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        t1, c1 = time.perf_counter(), time.process_time()
        if i >= spec["warmup"]:
            times.append(t1 - t0)
            cpu.append(c1 - c0)
    peak = rss_mb("VmHWM")
    return {
        "case": spec["case"],
        "trainable": trainable_summary(model),
        "trainable_params": sum(p.numel() for p in params),
        "time_s": statistics.median(times),
        "times_s": times,
        "cpu_s": statistics.median(cpu),
        "peak_mb": peak - base if (peak is not None and base is not None and reset) else float("nan"),
        "rss_peak_mb": peak if peak is not None else float("nan"),
        "rss_loaded_mb": base if base is not None else float("nan"),
        "losses": losses,
        "loadavg_before": load,
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for case in args.cases:
        spec = {
            "case": case,
            "rank": args.rank,
            "targets": args.targets,
            "batch": args.batch,
            "seq": args.seq,
            "threads": args.threads,
            "warmup": args.warmup,
            "repeats": args.repeats,
        }
        proc = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(spec)], check=False, capture_output=True, text=True
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{case} failed: {proc.stderr.strip()[-1500:]}")
        rows[case] = json.loads(lines[-1])
        r = rows[case]
        print(f"  {case}: {r['time_s']:.2f} s/step, +{r['peak_mb']:.0f} MB ({r['trainable']})", file=sys.stderr)
    full = rows.get("full")
    ratios = {}
    if full:
        for case, r in rows.items():
            ratios[case] = {"time": r["time_s"] / full["time_s"], "memory": r["peak_mb"] / full["peak_mb"]}
    return {
        "model": MODEL,
        "shape": {"batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq},
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "target_modules": args.targets},
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "results": rows,
        "ratios_vs_full": ratios,
    }


def format_markdown(report: dict[str, Any], command: str) -> str:
    shape, lora = report["shape"], report["lora"]
    lines = [
        f"# LoRA vs full fine-tuning: {report['model']} on CPU",
        "",
        f"`{command}`",
        "",
        (
            f"One training step (forward, fused-head token cross-entropy, backward, AdamW step) on "
            f"{shape['batch']} x {shape['seq']} tokens, float32, {report['threads']} threads, torch {report['torch']}; "
            f"LoRA r={lora['r']}, alpha={lora['alpha']} on {', '.join(lora['target_modules'])}. "
            "Step memory = peak RSS during the steps minus the RSS with the model loaded."
        ),
        "",
        "| case | trainable parameters | step time (s) | CPU time (s) | step memory (MB) | peak RSS (MB) | time vs full | memory vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, r in report["results"].items():
        ratio = report["ratios_vs_full"].get(case, {})
        lines.append(
            f"| {case} | {r['trainable']} | {r['time_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_mb']:.0f} | "
            f"{r['rss_peak_mb']:.0f} | {ratio.get('time', float('nan')):.2f}x | {ratio.get('memory', float('nan')):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON spec) and print its row
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out-name", default="lora_cpu", help="file stem under --out-dir")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    report = bench(args)
    command = "python benchmarks/bench_lora.py " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = format_markdown(report, command.strip())
    print(markdown)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.out_name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out_dir / f"{args.out_name}.md").write_text(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
