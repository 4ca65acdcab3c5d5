"""The ``losslab`` command: argument parsing and dispatch only.

Each subcommand's work lives in its own module (imported lazily, so ``--help`` is fast);
a handler takes the parsed ``argparse.Namespace`` and returns an exit status.
Exit status: 0 success, 2 bad input or config (a :class:`UserError`), 1 internal error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from collections.abc import Callable, Sequence

from losslab import __version__
from losslab.errors import UserError

MODEL_NAMES_HELP = (
    "builtin:smollm2-135m-instruct, builtin:minilm-l6, builtin:tiny-llama, a local directory, "
    "or a hub id (only where a hub is reachable)"
)

Handler = Callable[[argparse.Namespace], int]


def _lazy(module: str, function: str) -> Handler:
    """A handler that imports ``module`` when the command runs and calls its ``function``."""

    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), function)(args) or 0)

    return run


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=36)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="losslab",
        description="Design, check and compare the loss functions used to fine-tune LLMs.",
        formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"losslab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        help="show which tokens of a dataset are trained (loss mask and weights)",
        description="Render records with a tokenizer's chat template or a prompt style and show the "
        "loss mask: trained tokens highlighted, weights shown, one summary line.",
        formatter_class=_formatter,
    )
    p.add_argument("data", help="records file (jsonl, json, csv, parquet): chat or instruction records")
    p.add_argument("--tokenizer", default="builtin:smollm2-135m-instruct", help=f"tokenizer: {MODEL_NAMES_HELP}")
    p.add_argument("--mask", default=None, help="mask policy: assistant | last | completion | all; default: assistant for chat, completion for instruction")
    p.add_argument("--strategy", default="auto", choices=["auto", "concat", "expand"], help="multi-turn strategy")
    p.add_argument("--format", default="text", choices=["text", "html", "jsonl"], help="output format")
    p.add_argument("--out", default=None, help="write the output here instead of stdout")
    p.add_argument("--template", default=None, help="Jinja chat template file to use instead of the tokenizer's own")
    p.add_argument("--prompt-style", default="chat_template", help="instruction records: alpaca | chat_template")
    p.add_argument("--no-mask-prompt", action="store_true", help="train the prompt too: instruction records train prompt and response, chats train every turn (mask all)")
    p.add_argument("--max-length", type=int, default=None, help="truncate samples to this many tokens")
    p.add_argument("--truncation", default="end", choices=["end", "start"], help="which end of a sample to drop when it is too long ('end' keeps the start)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"], help="bad records: stop with an error, or skip and count them")
    p.add_argument("--role-weight", action="append", default=None, metavar="ROLE=W", help="token weight of a role (system, user, assistant, tool), repeatable; multiplies each message's own weight")
    p.add_argument("--color", default="auto", choices=["auto", "always", "never"], help="text format: highlight trained tokens with ANSI colours")
    p.set_defaults(handler=_lazy("losslab.masking.inspect", "run_inspect"))

    for name, what, module in (
        ("train", "fine-tune a model from a YAML config", "losslab.train.command"),
        ("compare", "run loss variants x seeds and write a report with confidence intervals", "losslab.compare.study"),
    ):
        p = sub.add_parser(name, help=what, description=what, formatter_class=_formatter)
        p.add_argument("config", help="YAML config file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value (dotted key), repeatable")
        p.set_defaults(handler=_lazy(module, f"run_{name}"))

    bench = sub.add_parser("bench", help="benchmarks", formatter_class=_formatter)
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = bench_sub.add_parser(
        "loss-head",
        help="fused loss head vs plain logits + cross-entropy vs PyTorch's chunked path (time, peak memory)",
        formatter_class=_formatter,
    )
    p.add_argument("--tokens", type=int, default=4096, help="N, tokens per batch")
    p.add_argument("--hidden", type=int, default=576, help="d, hidden size")
    p.add_argument("--vocab", type=int, default=49152, help="V, vocabulary size")
    p.add_argument("--ignored-fraction", type=float, default=0.0, help="fraction of labels set to ignore_index (the all-valid case always runs as well)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per method (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per method before the timed ones")
    p.add_argument("--options", nargs="+", default=["plain", "label_smoothing", "focal", "z_loss", "token_weights"], help="loss options to run")
    p.add_argument("--methods", nargs="+", default=["plain", "torch_chunked", "losslab"], help="methods to run (also: liger, on CUDA with liger_kernel installed)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="input dtype")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(handler=_lazy("losslab.losses.bench", "run_bench_loss_head"))

    data = sub.add_parser("data", help="embedded datasets", formatter_class=_formatter)
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser(
        "prepare",
        help="prepare the embedded datasets from installed packages as JSONL splits",
        formatter_class=_formatter,
    )
    p.add_argument("--out", default=None, help="output directory (default: $LOSSLAB_CACHE/data or ~/.cache/losslab/data)")
    p.add_argument("--only", action="append", default=None, help="prepare only this dataset (repeatable)")
    p.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    p.set_defaults(handler=_lazy("losslab.data.prepare", "run_prepare"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"losslab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        status = getattr(exc, "exit_status", 130)  # 143 after SIGTERM
        if os.environ.get("RANK", "0") != "0":  # under a launcher: rank 0 speaks for every process
            return status
        print(f"losslab: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        if args.command in ("train", "compare"):
            command = shlex.join(["losslab", *(sys.argv[1:] if argv is None else argv)])
            if "LOCAL_RANK" in os.environ:
                print("losslab: to resume, run the same launch command again (torchrun / accelerate launch ...)",
                      file=sys.stderr)
            else:
                print(f"losslab: to resume, run the same command again: {command}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
