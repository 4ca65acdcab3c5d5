"""The `losslab` command: version, help everywhere, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from losslab import __version__
from losslab.cli import build_parser, main

SUBCOMMANDS = [["inspect"], ["train"], ["compare"], ["bench"], ["bench", "loss-head"], ["data"], ["data", "prepare"]]


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"losslab {__version__}"


@pytest.mark.parametrize("argv", [[], *SUBCOMMANDS], ids=lambda a: " ".join(a) or "losslab")
def test_help_everywhere_shows_defaults(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: losslab" in out
    if argv in (["inspect"], ["bench", "loss-head"], ["data", "prepare"]):
        assert "(default:" in out


def test_contract_options_exist() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "inspect",
            "d.jsonl",
            "--tokenizer",
            "builtin:tiny-llama",
            "--mask",
            "last",
            "--strategy",
            "expand",
            "--format",
            "jsonl",
            "--out",
            "o.jsonl",
        ]
    )
    assert (args.mask, args.strategy, args.format) == ("last", "expand", "jsonl")
    args = parser.parse_args(
        ["bench", "loss-head", "--tokens", "8", "--hidden", "4", "--vocab", "16", "--ignored-fraction", "0.5", "--json"]
    )
    assert (args.tokens, args.hidden, args.vocab, args.ignored_fraction, args.json) == (8, 4, 16, 0.5, True)
    args = parser.parse_args(["train", "c.yaml", "--set", "a.b=1", "--set", "c=2"])
    assert args.overrides == ["a.b=1", "c=2"]


def test_bad_usage_exits_2() -> None:
    done = subprocess.run([sys.executable, "-m", "losslab.cli", "inspect"], check=False, capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_console_script_installed() -> None:
    done = subprocess.run(
        ["losslab", "--version"], check=False, capture_output=True, text=True, env={"PATH": f"{sys.prefix}/bin"}
    )
    assert done.returncode == 0 and __version__ in done.stdout
