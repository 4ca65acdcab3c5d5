"""Speed of ``losslab audit`` on 4,000 chit-chat records, without and with a labels file.

    .venv/bin/python benchmarks/bench_audit.py                      # 4,000 records, 2 cores, 2 workers
    .venv/bin/python benchmarks/bench_audit.py --records 500 --json out.json

The records are the first ``--records`` conversations of the builtin chit-chat dataset (train,
then validation, then test split; SmolLM2's tokenizer and template). The labels file is
losslab's own mask of every record (written before the clock starts), so the audit with labels
compares every token and finds nothing. Each audit runs as the real command,
``losslab audit DATA [--labels LABELS] --format json --out REPORT --workers N``, in a child
process pinned to ``--cores`` CPUs (Linux), and its wall time counts everything: interpreter
start, imports, tokenizer load, reading, masking, comparison, the report. The target is under
one minute each on 2 cores. Wall times on a shared machine are upper bounds; the CPU seconds
(all the audit's processes) hold on a loaded machine too.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from losslab.audit.reference import Reference
from losslab.data.builtin import resolve_data_path
from losslab.data.records import Source
from losslab.data.schemas import ChatRecord
from losslab.labels import IGNORE_INDEX
from losslab.models import load_tokenizer


def chitchat(n: int) -> list[str]:
    lines: list[str] = []
    for split in ("train", "validation", "test"):
        lines += [line for line in resolve_data_path("builtin:chitchat", split).read_text("utf-8").splitlines() if line]
    if len(lines) < n:
        raise SystemExit(f"the chit-chat dataset has {len(lines)} records, fewer than {n}")
    return lines[:n]


def write_labels(lines: list[str], tokenizer_name: str, path: Path) -> None:
    ref = Reference(load_tokenizer(tokenizer_name))
    with path.open("w", encoding="utf-8") as fh:
        for i, line in enumerate(lines, 1):
            view = ref.view(ChatRecord.model_validate_json(line), Source("data", i))
            ids = view.input_ids.tolist()
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, view.trained)]
            fh.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")


def run(args: list[str], cores: int) -> tuple[float, float, int]:
    """Wall and CPU seconds (user + system, all its processes) of one audit, and its exit status."""

    def pin() -> None:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "losslab.cli", "audit", *args], preexec_fn=pin, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--cores", type=int, default=2, help="CPUs the audit may use (sched_setaffinity)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizer", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--json", default=None, help="write the results here")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data, labels = folder / "chitchat.jsonl", folder / "labels.jsonl"
        lines = chitchat(opts.records)
        data.write_text("\n".join(lines) + "\n", encoding="utf-8")
        write_labels(lines, opts.tokenizer, labels)
        common = ["--tokenizer", opts.tokenizer, "--format", "json", "--workers", str(opts.workers)]
        results = {"records": opts.records, "cores": opts.cores, "workers": opts.workers}
        for name, extra in (("without labels", []), ("with labels", ["--labels", str(labels)])):
            report = folder / "report.json"
            seconds, cpu, status = run([str(data), *extra, *common, "--out", str(report)], opts.cores)
            payload = json.loads(report.read_text(encoding="utf-8"))
            totals = payload["tables"]["totals"][0]
            results[name] = {
                "seconds": round(seconds, 1),
                "cpu_seconds": round(cpu, 1),
                "exit": status,
                "findings": len(payload["findings"]),
            }
            print(
                f"{name:>15}: {seconds:6.1f} s wall, {cpu:6.1f} s CPU  ({totals['records']} records, "
                f"{totals['tokens']} tokens, "
                f"{len(payload['findings'])} findings, exit {status})",
                flush=True,
            )
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
