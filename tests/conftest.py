"""Test-wide settings (everything offline, deterministic, one thread per test process) and the
helpers shared by every folder: the config factory of short training runs, free ports, polling.

Test modules import the helpers with a relative import (``from ..conftest import train_config``).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)  # pytest -n 2 runs two workers on two cores


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from losslab.models import load_tokenizer

    return load_tokenizer("builtin:smollm2-135m-instruct")


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model (any task) fails the test: bad input must be reported before that.
    Tokenizers load once per test, however many times a task asks."""
    import importlib

    import losslab.models

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the bad input was reported")

    tokenizers: dict[str, Any] = {}
    real = losslab.models.load_tokenizer

    def cached(name: str, **kwargs: Any) -> Any:
        if name not in tokenizers:
            tokenizers[name] = real(name, **kwargs)
        return tokenizers[name]

    for task in (
        "causal_lm",
        "sequence_classification",
        "token_classification",
        "reward_model",
        "embedding",
        "preference",
    ):
        module = importlib.import_module(f"losslab.train.tasks.{task}")
        for name in ("load_model", "load_causal_lm"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, boom)
        monkeypatch.setattr(module, "load_tokenizer", cached)


# ---- the config of a short training run ---------------------------------------------------------

TINY_LLAMA = "builtin:tiny-llama"
CHATTERBOT = "builtin:chatterbot"
_MERGED = ("data", "training")  # the fields merged key by key; any other field is replaced


def train_config(out: Path | str | None, *, validation: bool = False, **fields: Any) -> dict[str, Any]:
    """The config dict of a short run: causal_lm on the tiny Llama, 24 samples of builtin:chatterbot
    cut at 48 tokens, token cross-entropy, 6 steps of batch 4 at lr 3e-3, no evaluation.

    ``out`` is the output_dir (None: none, e.g. a study's base). Each keyword is a top-level field:
    ``data`` and ``training`` merge into the defaults key by key, any other field replaces its
    default; a None value (for a field, or a key of data/training) leaves it out. ``validation``:
    validate on the training data set (``data.validation`` = ``data.train``) and evaluate that
    split at the end (``eval.splits: [validation]``) unless ``eval`` is given.
    """
    config: dict[str, Any] = {
        "task": "causal_lm",
        "model": TINY_LLAMA,
        "output_dir": None if out is None else str(out),
        "data": {"train": CHATTERBOT, "max_length": 48, "max_train_samples": 24},
        "loss": {"terms": [{"name": "token_cross_entropy"}]},
        "training": {"max_steps": 6, "batch_size": 4, "lr": 3e-3},
        "eval": {"splits": ["validation"] if validation else []},
    }
    for name, value in fields.items():
        if name in _MERGED and value is not None:
            value = {**config[name], **value}
        config[name] = value
    if validation and config["data"] is not None:
        config["data"].setdefault("validation", config["data"]["train"])
    for section in _MERGED:
        if isinstance(config.get(section), dict):
            config[section] = {k: v for k, v in config[section].items() if v is not None}
    return {k: v for k, v in config.items() if v is not None}


# ---- processes: free ports, waiting for a condition ---------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the system picks it), for a launcher's --master_port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], bool],
    proc: Any = None,
    timeout: float = 240,
    poll: float = 0.005,
    what: Callable[[], str] | str = "",
) -> None:
    """Poll ``condition`` every ``poll`` seconds until it holds; fail after ``timeout`` seconds, or
    as soon as ``proc`` (a ``subprocess.Popen``) has ended. ``what``: text (or a function giving
    it, e.g. the tail of a log) added to the failure message."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = proc is not None and proc.poll() is not None
        if ended or time.monotonic() >= deadline:
            detail = what() if callable(what) else what
            reason = f"the process ended (exit {proc.returncode})" if ended else f"not within {timeout:.0f} s"
            raise AssertionError(f"the awaited point was not reached: {reason}\n{detail}")
        time.sleep(poll)
