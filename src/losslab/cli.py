"""The ``losslab`` command: argument parsing and dispatch only.

Each subcommand's work lives in its own module (imported lazily, so ``--help`` is fast);
a handler takes the parsed ``argparse.Namespace`` and returns an exit status.
Exit status: 0 success, 2 bad input or config (a :class:`UserError`), 1 internal error.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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


# ---- option types (a bad value: exit 2, "argument --NAME: ...") and path checks (see check_paths) ----

MAX_INT = 2**31 - 1  # sizes and counts past this are never meant (and overflow tensor indices)


def _int_in(low: int, high: int = MAX_INT) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            bound = f">= {low}" if high == MAX_INT else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _shard(text: str) -> tuple[int, int]:
    """``K/N`` with 1 <= K <= N, e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``."""
    k, sep, n = text.partition("/")
    if not sep or not k.strip().isdigit() or not n.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected K/N (share K of N, e.g. 1/4), got {text!r}")
    if not 1 <= int(k) <= int(n):
        raise argparse.ArgumentTypeError(f"K must be between 1 and N, got {text!r}")
    return int(k), int(n)


def _ray_address(text: str) -> str:
    """``auto``, ``local``, ``host:port`` or ``ray://host:port``."""
    rest = text.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if rest not in ("auto", "local") and not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise argparse.ArgumentTypeError(f"expected host:port, ray://host:port, auto or local, got {text!r}")
    return text


def _fraction(text: str) -> float:
    """A number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _effect(text: str) -> tuple[float, bool]:
    """``--effect``: ``2%`` -> (0.02, relative to the baseline's mean), ``0.5`` -> (0.5, absolute)."""
    raw = text.strip()
    relative = raw.endswith("%")
    try:
        value = float(raw[:-1] if relative else raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an effect size: {text!r} (a number in the metric's units, or a percentage such as 2%)"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"the effect must be a positive finite number, got {text!r}")
    return (value / 100, True) if relative else (value, False)


def _input_file(text: str) -> str:
    """An existing, readable file."""
    path = Path(text).expanduser()
    if not text or not path.exists():
        raise argparse.ArgumentTypeError(f"file not found: {text!r}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"{text!r} is a directory, not a file" if path.is_dir() else f"{text!r} is not a file"
        )
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not readable")
    return text


def _template(text: str) -> str:
    """A Jinja chat template file (or template text), compiled here: a syntax error names the line."""
    from losslab.masking.render import load_template

    try:
        load_template(text if "{{" in text or "{%" in text else _input_file(text))
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _output_file(text: str) -> str:
    """A file to write: not a directory, in an existing writable directory."""
    path = Path(text).expanduser()
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    return text


def _output_dir(text: str) -> str:
    """A folder to write into: an existing one, or one that can be created."""
    from losslab.config import output_dir_problem

    problem = output_dir_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _device(text: str) -> str:
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


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
    p.add_argument(
        "--mask",
        default=None,
        help="mask policy: assistant | last | completion | all; default: assistant for chat, completion for instruction",
    )
    p.add_argument("--strategy", default="auto", choices=["auto", "concat", "expand"], help="multi-turn strategy")
    p.add_argument("--format", default="text", choices=["text", "html", "jsonl"], help="output format")
    p.add_argument("--out", default=None, help="write the output here instead of stdout")
    p.add_argument("--template", default=None, help="Jinja chat template file to use instead of the tokenizer's own")
    p.add_argument("--prompt-style", default="chat_template", help="instruction records: alpaca | chat_template")
    p.add_argument(
        "--no-mask-prompt",
        action="store_true",
        help="train the prompt too: instruction records train prompt and response, chats train every turn (mask all)",
    )
    p.add_argument("--max-length", type=_int_in(1), default=None, help="truncate samples to this many tokens")
    p.add_argument(
        "--truncation",
        default="end",
        choices=["end", "start"],
        help="which end of a sample to drop when it is too long ('end' keeps the start)",
    )
    p.add_argument("--limit", type=_int_in(0), default=None, help="only the first N records")
    p.add_argument(
        "--on-error",
        default="raise",
        choices=["raise", "skip"],
        help="bad records: stop with an error, or skip and count them",
    )
    p.add_argument(
        "--role-weight",
        action="append",
        default=None,
        metavar="ROLE=W",
        help="token weight of a role (system, user, assistant, tool), repeatable; multiplies each message's own weight",
    )
    p.add_argument(
        "--color",
        default="auto",
        choices=["auto", "always", "never"],
        help="text format: highlight trained tokens with ANSI colours",
    )
    p.set_defaults(
        handler=_lazy("losslab.masking.inspect", "run_inspect"),
        path_checks={"data": _input_file, "--out": _output_file, "--template": _template},
    )

    for name, what, module in (
        ("train", "fine-tune a model from a YAML config", "losslab.train.command"),
        ("compare", "run loss variants x seeds and write a report with confidence intervals", "losslab.compare.study"),
    ):
        p = sub.add_parser(name, help=what, description=what, formatter_class=_formatter)
        p.add_argument("config", help="YAML config file")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value (dotted key), repeatable",
        )
        if name == "compare":
            p.add_argument(
                "--plan",
                action="store_true",
                help="print the seeds x test examples needed for 80%% power, from this finished study (trains nothing)",
            )
            p.add_argument(
                "--effect",
                type=_effect,
                default=None,
                metavar="E",
                help="with --plan: the difference to find, relative to the baseline's mean (2%%) or absolute (0.5)",
            )
            p.add_argument(
                "--backend",
                choices=["sequential", "processes", "ray"],
                default=None,
                help="where the runs execute (default: the study's execution.backend, else sequential)",
            )
            p.add_argument(
                "--workers",
                type=_int_in(1),
                default=None,
                metavar="N",
                help="processes: worker processes; ray: runs at once (default: the study's execution.workers)",
            )
            p.add_argument(
                "--ray-address",
                type=_ray_address,
                default=None,
                metavar="ADDR",
                help="ray: the cluster to join, ray://host:10001 or host:6379 (default: a local cluster)",
            )
            p.add_argument(
                "--shard",
                type=_shard,
                default=None,
                metavar="K/N",
                help="train only share K of N of the runs (a SLURM job array), no report; "
                "then a plain `losslab compare` writes the report",
            )
        p.set_defaults(handler=_lazy(module, f"run_{name}"), path_checks={"config": _input_file})

    p = sub.add_parser(
        "audit",
        help="check a setup's loss before training: masks (any framework's labels), normalisation, loss scale",
        description="Audit a records file (its loss masks, or another framework's labels for it with --labels) "
        "or a losslab train/compare YAML config (normalisation under accumulation, packing and processes; "
        "each loss term's scale). Exit status: 0 no finding at or above --fail-on, 1 findings, 2 bad input.",
        formatter_class=_formatter,
    )
    p.add_argument("target", help="records file (jsonl, json, csv, parquet) or a train/compare YAML config")
    p.add_argument(
        "--labels",
        default=None,
        help="JSONL, one line per record: {input_ids, labels} (-100 = not trained) or {input_ids, assistant_masks}",
    )
    p.add_argument("--tokenizer", default="builtin:smollm2-135m-instruct", help=f"tokenizer: {MODEL_NAMES_HELP}")
    p.add_argument(
        "--mask",
        default=None,
        help="mask policy to compare against: assistant | last | completion | all; default: assistant for chat, "
        "completion for instruction",
    )
    p.add_argument("--template", default=None, help="Jinja chat template file to use instead of the tokenizer's own")
    p.add_argument("--max-length", type=_int_in(1), default=None, help="truncate samples to this many tokens")
    p.add_argument("--format", default="text", choices=["text", "json", "html"], help="output format")
    p.add_argument("--out", default=None, help="write the report here instead of stdout")
    p.add_argument(
        "--fail-on",
        default="warning",
        choices=["info", "warning", "error"],
        help="exit 1 when a finding at or above this level is found",
    )
    p.add_argument("--limit", type=_int_in(0), default=None, help="only the first N records")
    p.set_defaults(
        handler=_lazy("losslab.audit.command", "run_audit"),
        path_checks={"target": _input_file, "--labels": _input_file, "--out": _output_file, "--template": _template},
    )

    bench = sub.add_parser("bench", help="benchmarks", formatter_class=_formatter)
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = bench_sub.add_parser(
        "loss-head",
        help="fused loss head vs plain logits + cross-entropy vs PyTorch's chunked path (time, peak memory)",
        formatter_class=_formatter,
    )
    p.add_argument("--tokens", type=_int_in(1), default=4096, help="N, tokens per batch")
    p.add_argument("--hidden", type=_int_in(1), default=576, help="d, hidden size")
    p.add_argument("--vocab", type=_int_in(1), default=49152, help="V, vocabulary size")
    p.add_argument(
        "--ignored-fraction",
        type=_fraction,
        default=0.0,
        help="fraction of labels set to ignore_index (the all-valid case always runs as well)",
    )
    p.add_argument("--repeats", type=_int_in(1), default=3, help="timed repetitions per method (median reported)")
    p.add_argument("--warmup", type=_int_in(0), default=1, help="untimed runs per method before the timed ones")
    p.add_argument(
        "--options",
        nargs="+",
        default=["plain", "label_smoothing", "focal", "z_loss", "token_weights"],
        help="loss options to run",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["plain", "torch_chunked", "losslab"],
        help="methods to run (also: liger, on CUDA with liger_kernel installed)",
    )
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda")
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
    p.add_argument(
        "--out", default=None, help="output directory (default: $LOSSLAB_CACHE/data or ~/.cache/losslab/data)"
    )
    p.add_argument("--only", action="append", default=None, help="prepare only this dataset (repeatable)")
    p.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    p.set_defaults(handler=_lazy("losslab.data.prepare", "run_prepare"), path_checks={"--out": _output_dir})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_paths(args)
        return args.handler(args)
    except UserError as exc:
        print(f"losslab: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # only on a path the user named (checked above, changed since): others are internal errors
        path = _user_path(exc, args)
        if path is None:
            raise
        print(f"losslab: error: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        status = getattr(exc, "exit_status", 130)  # 143 after SIGTERM
        if os.environ.get("RANK", "0") != "0":  # under a launcher: rank 0 speaks for every process
            return status
        print(f"losslab: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        if args.command in ("train", "compare"):
            command = shlex.join(["losslab", *(sys.argv[1:] if argv is None else argv)])
            if "LOCAL_RANK" in os.environ:
                print(
                    "losslab: to resume, run the same launch command again (torchrun / accelerate launch ...)",
                    file=sys.stderr,
                )
            else:
                print(f"losslab: to resume, run the same command again: {command}", file=sys.stderr)
        return status


def check_paths(args: argparse.Namespace) -> None:
    """The paths on the command line (the subcommand's ``path_checks``): a ``UserError`` naming the
    option. Run after parsing, before any work (not as argparse types: parsing stays pure syntax)."""
    for option, check in getattr(args, "path_checks", {}).items():
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is not None:
            try:
                check(value)
            except argparse.ArgumentTypeError as exc:
                raise UserError(f"argument {option}: {exc}") from None


def _user_path(exc: OSError, args: argparse.Namespace) -> str | None:
    """The path of ``exc`` when it is one the command line named (or lies inside one), else None."""
    named = [
        Path(v).expanduser().absolute()
        for k, v in vars(args).items()
        if k in ("data", "config", "out", "template") and isinstance(v, str) and v
    ]
    for filename in (exc.filename, exc.filename2):
        if isinstance(filename, (str, os.PathLike)):
            path = Path(filename).absolute()
            if any(path == p or path.is_relative_to(p) for p in named):
                return str(filename)
    return None


if __name__ == "__main__":
    sys.exit(main())
