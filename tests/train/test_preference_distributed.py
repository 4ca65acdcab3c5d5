"""The preference task in two processes (torchrun, gloo on CPU) gives the same losses, monitor
values, gradient norms and weights as in one: DPO's sum over pairs / the step's pairs, the
per-step monitor means over processes, and the cached reference read by every rank."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ..conftest import free_port, train_config
from .test_distributed import run, steps


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.prefix) / "bin" / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_two_processes_equal_one(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for out, batch_size in ((one, 4), (two, 2)):  # 2 x 2 = the same global batch
        data = train_config(
            out,
            task="preference",
            loss={"terms": [{"name": "preference", "loss_type": "sigmoid"}, {"name": "token_cross_entropy"}]},
            data={"train": "builtin:preference", "max_train_samples": 8, "max_length": 48},
            training={"max_steps": 2, "batch_size": batch_size, "lr": 1e-3, "save_steps": 100},
        )
        (tmp_path / f"{out.name}.yaml").write_text(yaml.safe_dump(data))
    run([sys.executable, "-m", "losslab.cli", "train", "one.yaml"], tmp_path)
    torchrun = str(Path(sys.prefix) / "bin" / "torchrun")
    port = str(free_port())
    run([torchrun, "--nproc_per_node", "2", "--master_port", port, "-m", "losslab.cli", "train", "two.yaml"], tmp_path)
    a, b = steps(one), steps(two)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for key in ("loss", "loss/preference", "loss/token_cross_entropy", "logps/chosen"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), key
        # a reward is beta x a difference of two ~-200 float32 log-probs: rounding ~1e-6 absolute
        assert y["rewards/margin"] == pytest.approx(x["rewards/margin"], abs=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
    assert json.loads((two / "summary.json").read_text())["reference"].startswith("cache")
