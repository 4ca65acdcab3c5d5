"""The two-process step of the normalisation audit: ``torchrun --nproc_per_node 2`` (gloo on
CPU) runs this module, which builds the same setup, takes the same fixed batch (B/2 samples per
process) and writes the step's loss and gradients from process 0 (:func:`two_process_step`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from losslab.audit.one_step import Step, trainer_step
from losslab.audit.setup import build_setup, load_loss_func
from losslab.train.config import TrainConfig


def torchrun() -> str | None:
    """The ``torchrun`` launcher next to this Python, or on the PATH; None when there is none."""
    local = Path(sys.executable).parent / "torchrun"
    return str(local) if local.exists() else shutil.which("torchrun")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def two_process_step(
    config: TrainConfig, batch: int, *, loss_func: str | None, collator: str = "padded", timeout: float = 600
) -> Step:
    """The Trainer's step over the fixed batch on 2 processes of B/2 samples each.
    ``loss_func``: a ``--loss-func`` spec, or None for losslab's loss; ``collator``: padded | packed."""
    launcher = torchrun()
    if launcher is None:
        raise RuntimeError("torchrun is not installed")
    with tempfile.TemporaryDirectory(prefix="losslab-audit-2p-") as tmp:
        spec = {
            "config": config.model_dump(mode="json"),
            "batch": batch,
            "loss_func": loss_func,
            "collator": collator,
            "out": str(Path(tmp) / "step.pt"),
            "cwd": os.getcwd(),
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        cmd = [
            launcher,
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "losslab.audit.processes",
            str(Path(tmp) / "spec.json"),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun exited with {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
        saved: dict[str, Any] = torch.load(str(spec["out"]), weights_only=True)
        return Step(float(saved["loss"]), saved["grads"])


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    os.chdir(spec["cwd"])
    config = TrainConfig.model_validate(spec["config"])
    setup = build_setup(config, spec["batch"])
    loss = load_loss_func(spec["loss_func"]) if spec["loss_func"] else setup.adapter()
    collator = setup.packed if spec["collator"] == "packed" and setup.packed is not None else setup.padded
    step = trainer_step(setup.run.model, setup.samples, collator, loss, batch_size=spec["batch"] // 2, seed=config.seed)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"loss": step.loss, "grads": step.grads}, spec["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
