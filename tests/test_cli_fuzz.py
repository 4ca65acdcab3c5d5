"""Bad values for every option of every subcommand: exit 2, a message naming the option (or the
path), never a traceback. In process through ``losslab.cli.main``; a few as a subprocess.

Each subcommand's options are listed from the parser itself, and a test checks that every one
of them has bad values in :data:`BAD`, so a new option without cases fails here.
(Unreadable files are not swept: the tests may run as root, who reads every file.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from losslab.cli import build_parser, main

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
HUGE = str(2**40)


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    """``file`` (a chat record), ``dir``, ``missing``, ``under_file`` (a path below a file),
    ``bad_template`` (a Jinja syntax error on line 2), ``latin1`` (not UTF-8)."""
    (tmp_path / "data.jsonl").write_text(json.dumps(CHAT) + "\n", encoding="utf-8")
    (tmp_path / "dir").mkdir()
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}", encoding="utf-8")
    (tmp_path / "latin1.jinja").write_bytes(b"{{ messages }}\n\xe9\n")
    return {
        "file": str(tmp_path / "data.jsonl"),
        "dir": str(tmp_path / "dir"),
        "missing": str(tmp_path / "missing"),
        "under_file": str(tmp_path / "data.jsonl" / "sub"),
        "bad_template": str(tmp_path / "bad.jinja"),
        "latin1": str(tmp_path / "latin1.jinja"),
    }


# option -> bad values ("{file}" etc. are filled from `paths`), per subcommand; each must exit 2 naming
# the option (or, for a path, the path): expected text is the option unless given as (value, text)
BAD: dict[tuple[str, ...], dict[str, list]] = {
    ("inspect",): {
        "data": ["", "{missing}", "{dir}"],
        "--tokenizer": [
            ("", "model path"),
            ("{missing}", "could not be loaded"),
            ("{dir}", "model path"),
            ("{file}", "model path"),
            ("builtin:nope", "unknown builtin model"),
        ],
        "--mask": [("", "mask policy"), ("bogus", "mask policy"), ("-1", "mask policy")],
        "--strategy": ["", "both"],
        "--format": ["", "pdf"],
        "--out": ["", "{dir}", "{under_file}", "{missing}/x.txt"],
        "--template": [
            "",
            "{missing}",
            "{dir}",
            ("{bad_template}", "bad.jinja:2: invalid Jinja chat template"),
            ("{latin1}", "latin1.jinja:2: chat template is not UTF-8"),
        ],
        "--prompt-style": [("", "prompt_style"), ("bogus", "prompt_style")],
        "--max-length": ["0", "-1", "abc", "1.5", HUGE],
        "--truncation": ["", "middle"],
        "--limit": ["-1", "abc", HUGE],
        "--on-error": ["", "ignore"],
        "--role-weight": [
            ("x", "--role-weight"),
            ("user=abc", "--role-weight"),
            ("robot=1", "unknown role 'robot'"),
            ("user=-1", "weight of 'user'"),
            ("user=nan", "weight of 'user'"),
        ],
        "--color": ["", "rainbow"],
    },
    ("bench", "loss-head"): {
        **{opt: ["0", "-1", "abc", "2.5", HUGE] for opt in ("--tokens", "--hidden", "--vocab", "--repeats")},
        "--ignored-fraction": ["1", "-0.1", "nan", "inf", "abc", ""],
        "--warmup": ["-1", "abc", HUGE],
        "--options": ["bogus"],
        "--methods": ["bogus"],
        "--device": ["", "gpu", "cuda:x"],
        "--dtype": ["", "float16"],
    },
    ("data", "prepare"): {
        "--out": ["", "{file}", "{under_file}"],
        "--only": [("", "unknown dataset"), ("bogus", "unknown dataset")],
    },
    ("train",): {
        "config": ["", "{missing}", "{dir}", ("{file}", "invalid config")],
        "--set": [("novalue", "KEY=VALUE"), ("=1", "KEY=VALUE")],
    },
    ("compare",): {
        "config": ["", "{missing}", "{dir}", ("{file}", "invalid config")],
        "--set": [("novalue", "KEY=VALUE"), ("=1", "KEY=VALUE")],
        "--effect": ["", "abc", "0", "-2%", "nan", "inf", "%", "2%%"],
        "--backend": ["", "gpu"],
        "--workers": ["", "0", "-1", "x"],
        "--ray-address": ["", "head", "head:port", "ray://head:0", ":6379"],
        "--shard": ["", "1", "0/2", "3/2", "a/b", "1/0"],
    },
}
FLAGS = {"--no-mask-prompt", "--force", "--json", "--help", "--version", "--plan"}  # no value to get wrong


def _options(parser: argparse.ArgumentParser, command: tuple[str, ...]) -> set[str]:
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {a.option_strings[0] if a.option_strings else a.dest for a in parser._actions} - {"-h"}


def test_every_option_of_every_subcommand_has_bad_values() -> None:
    parser = build_parser()
    for command, cases in BAD.items():
        missing = _options(parser, command) - set(cases) - {o.lstrip("-") for o in FLAGS} - FLAGS
        assert not missing, f"losslab {' '.join(command)}: no bad values for {sorted(missing)}"
    subcommands = {("inspect",), ("train",), ("compare",), ("bench", "loss-head"), ("data", "prepare")}
    assert set(BAD) == subcommands


def _argv(command: tuple[str, ...], option: str, value: str, paths: dict[str, str]) -> list[str]:
    value = value.format(**paths)
    good = {
        ("inspect",): [paths["file"], "--tokenizer", "builtin:tiny-llama"],
        ("train",): [paths["file"]],
        ("compare",): [paths["file"]],
        ("bench", "loss-head"): ["--tokens", "8", "--hidden", "4", "--vocab", "16"],
        ("data", "prepare"): ["--only", "bogus-but-never-reached"],
    }[command]
    if option.startswith("--"):
        if option == "--only":
            good = []
        if command == ("bench", "loss-head") and option in good:
            i = good.index(option)
            good = good[:i] + good[i + 2 :]
        if command == ("inspect",) and option == "--tokenizer":
            good = good[:1]
        return [*command, *good, f"{option}={value}"]  # one word, so a value like -1 is not read as an option
    return [*command, value, *good[1:]]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage error
        code = exc.code if isinstance(exc.code, int) else 1
    err = capsys.readouterr().err
    return code, err


CASES = [
    (command, option, value if isinstance(value, tuple) else (value, None))
    for command, cases in BAD.items()
    for option, values in cases.items()
    for value in values
]


@pytest.mark.parametrize(("command", "option", "case"), CASES, ids=[f"{' '.join(c)} {o}={v[0]!r}" for c, o, v in CASES])
def test_bad_option_exits_2_naming_it(
    command: tuple[str, ...],
    option: str,
    case: tuple[str, str | None],
    paths: dict[str, str],
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from losslab.losses import bench

    def no_workers(*args: object, **kwargs: object) -> None:
        raise AssertionError("a benchmark worker started before the bad option was reported")

    monkeypatch.setattr(bench, "_run_in_subprocess", no_workers)
    value, expected = case
    argv = _argv(command, option, value, paths)
    code, err = run_cli(argv, capsys)
    assert code == 2, (argv, err)
    assert "Traceback" not in err, err
    assert (expected or option) in err, (argv, err)


def test_bench_sizes_that_cannot_fit_in_memory_name_the_options(capsys: pytest.CaptureFixture) -> None:
    code, err = run_cli(["bench", "loss-head", "--tokens", "2000000000", "--vocab", "2000000"], capsys)
    assert code == 2 and "--tokens 2000000000" in err and "--vocab 2000000" in err and "GiB" in err, err


def test_bench_exits_1_when_a_case_fails(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from losslab.losses import bench

    monkeypatch.setattr(
        bench,
        "_run_in_subprocess",
        lambda spec, timeout: {**bench._case_key(spec), "supported": True, "error": "exit 1: boom"},
    )
    code, err = run_cli(
        ["bench", "loss-head", "--tokens", "8", "--hidden", "4", "--vocab", "16", "--options", "plain"], capsys
    )
    assert code == 1 and "cases failed" in err, err


def test_an_oserror_on_a_named_path_is_exit_2_and_others_are_not_caught(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from losslab.data import prepare

    out = tmp_path / "out"

    def fail(names: object, where: object, *, force: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(out / "chitchat" / "train.jsonl"))

    monkeypatch.setattr(prepare, "prepare", fail)
    code, err = run_cli(["data", "prepare", "--out", str(out)], capsys)
    assert code == 2 and f"{out / 'chitchat' / 'train.jsonl'}: Permission denied" in err, err

    def elsewhere(names: object, where: object, *, force: bool = False) -> None:
        raise PermissionError(13, "Permission denied", "/somewhere/else")

    monkeypatch.setattr(prepare, "prepare", elsewhere)
    with pytest.raises(PermissionError):  # not a path the user named: an internal error, with its traceback
        main(["data", "prepare", "--out", str(out)])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["inspect", "{file}", "--tokenizer", "builtin:tiny-llama", "--template", "{bad_template}"],
            "bad.jinja:2: invalid Jinja chat template: unexpected '}'",
        ),
        (["bench", "loss-head", "--vocab", "0"], "argument --vocab: must be >= 1, got 0"),
        (["data", "prepare", "--out", "{under_file}"], "argument --out: "),
    ],
)
def test_subprocess_exits_2_without_traceback(argv: list[str], expected: str, paths: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "losslab.cli", *(a.format(**paths) for a in argv)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and expected in done.stderr, done.stderr
