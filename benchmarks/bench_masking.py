"""Mask building speed (conversations per second on one core) and the tokens that `expand`
processes compared with `concat`, on a real multi-turn set: the Chit-Chat Challenge dialogues
of the PyPI package ``chitchat-dataset`` (7168 human conversations, ~19 turns each).

    .venv/bin/python benchmarks/bench_masking.py                    # every conversation, 3 rounds
    .venv/bin/python benchmarks/bench_masking.py --limit 500 --rounds 1 --json out.json
    .venv/bin/python benchmarks/bench_masking.py --limit 600 --rounds 5 --strategies concat   # vs bare only

Each dialogue is converted on the fly: every run of consecutive utterances of one speaker
becomes one message (utterances joined by newlines), the first speaker is the user and the
other the assistant. The tokenizer and chat template are SmolLM2's (``--tokenizer``). One
process, one core (CPU affinity, one torch and one tokenizers thread). Speed is reported for
the fastest of ``--rounds`` rounds (the one least disturbed by other processes); token
counts do not depend on the round.

Beside the mask builders runs the floor they all pay, ``bare``: the same conversations through
``tokenizer.apply_chat_template(messages, tokenize=True)`` (render the template, tokenise).
Within a round, bare and every builder take turns on each chunk of 25 conversations, so their
ratio (``x bare``, and ``concat / bare per round``) holds on a loaded machine where absolute
speeds do not.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the Rust tokenizer's thread pool
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from losslab.data.records import Source
from losslab.data.schemas import ChatRecord
from losslab.masking import BuildStats, MaskBuilder, MaskConfig
from losslab.models import load_tokenizer
from losslab.paths import package_dir


def chitchat_conversations(limit: int | None = None) -> list[ChatRecord]:
    """The chit-chat dialogues as alternating user/assistant chat records."""
    path = package_dir("chitchat_dataset", "chitchat-dataset") / "dataset.json"
    raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    records = []
    for conversation in raw.values():
        messages: list[dict[str, str]] = []
        speakers: list[str] = []
        for group in conversation["messages"]:
            text = "\n".join(u["text"] for u in group if u.get("text"))
            if not group or not text:
                continue
            if speakers and group[0]["sender"] == speakers[-1]:
                messages[-1]["content"] += "\n" + text  # the same speaker again: one message
                continue
            speakers.append(group[0]["sender"])
            messages.append({"role": "user" if len(messages) % 2 == 0 else "assistant", "content": text})
        if any(m["role"] == "assistant" for m in messages):
            records.append(ChatRecord.model_validate({"messages": messages}))
        if limit is not None and len(records) >= limit:
            break
    return records


def run(builder: MaskBuilder, records: list[ChatRecord], stats: BuildStats, first: int = 1) -> float:
    """Seconds to build ``records`` (numbered from ``first``), counted into ``stats``."""
    start = time.perf_counter()
    for i, record in enumerate(records, first):
        for seq in builder.encode(record, Source("chitchat", i), stats):
            stats.samples += 1
            stats.tokens += len(seq.input_ids)
            stats.trained_tokens += seq.trained
        stats.records += 1
    return time.perf_counter() - start


def run_bare(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> float:
    """The floor every template-based mask builder pays: render the template and tokenise."""
    start = time.perf_counter()
    for messages in conversations:
        tokenizer.apply_chat_template(messages, tokenize=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=None, help="only the first N conversations")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["concat", "expand", "auto"],
        choices=["concat", "expand", "auto"],
        help="mask builders to time beside the bare baseline",
    )
    args = parser.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import torch

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.tokenizer)
    records = chitchat_conversations(args.limit)
    turns = sum(len(r.messages) for r in records)
    print(
        f"{len(records)} conversations, {turns} messages ({turns / len(records):.1f} per conversation)", file=sys.stderr
    )

    results: dict[str, Any] = {"conversations": len(records), "messages": turns, "strategies": {}}
    plain = [[{"role": m.role, "content": m.content} for m in r.messages] for r in records]
    builders = {name: MaskBuilder(tokenizer, MaskConfig(strategy=name)) for name in args.strategies}
    best: dict[str, tuple[float, BuildStats | None, float | None]] = {}
    ratios: list[float] = []  # concat / bare per round: both measured under the same load
    chunk = 25  # within a round, bare and every builder take turns on each chunk of conversations
    for r in range(args.rounds):
        seconds_of = dict.fromkeys(("bare", *args.strategies), 0.0)
        stats_of = {name: BuildStats(strategy=name) for name in args.strategies}
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        for k in range(0, len(records), chunk):
            seconds_of["bare"] += run_bare(tokenizer, plain[k : k + chunk])
            for name in args.strategies:
                seconds_of[name] += run(builders[name], records[k : k + chunk], stats_of[name], k + 1)
        for name, seconds in seconds_of.items():
            print(
                f"  {name:6s} round {r + 1}: {len(records) / seconds:8.1f} conversations/s (load average {load})",
                file=sys.stderr,
                flush=True,
            )
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, stats_of.get(name), load)
        if "concat" in seconds_of:
            ratios.append(seconds_of["bare"] / seconds_of["concat"])
    for name, (seconds, stats, load) in best.items():
        row: dict[str, Any] = {
            "conversations_per_second": len(records) / seconds,
            "seconds": seconds,
            "load_average": load,
        }
        if stats is not None:
            row.update(
                samples=stats.samples,
                tokens=stats.tokens,
                trained_tokens=stats.trained_tokens,
                chosen=dict(stats.strategies),
            )
        results["strategies"][name] = row
    bare_speed = results["strategies"]["bare"]["conversations_per_second"]
    for row in results["strategies"].values():
        row["over_bare"] = row["conversations_per_second"] / bare_speed
    results["concat_over_bare_per_round"] = ratios

    print("| builder | conversations/s (1 core) | x bare | samples | tokens processed | trained tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results["strategies"].items():
        if name == "bare":
            print(f"| bare `apply_chat_template(tokenize=True)` | {r['conversations_per_second']:.0f} | 1.00 | | | |")
            continue
        chosen = f" ({', '.join(f'{k}: {v}' for k, v in r['chosen'].items())})" if name == "auto" else ""
        print(
            f"| {name}{chosen} | {r['conversations_per_second']:.0f} | {r['over_bare']:.2f} | {r['samples']} | "
            f"{r['tokens']} | {r['trained_tokens']} |"
        )
    if ratios:
        print(f"\nconcat / bare per round (same load): {', '.join(f'{x:.2f}' for x in ratios)}")
    if "concat" in results["strategies"] and "expand" in results["strategies"]:
        concat, expand = results["strategies"]["concat"], results["strategies"]["expand"]
        results["expand_over_concat_tokens"] = expand["tokens"] / concat["tokens"]
        print(
            f"\nexpand processes {results['expand_over_concat_tokens']:.2f}x the tokens of concat "
            f"for the same {concat['trained_tokens']} trained tokens"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
