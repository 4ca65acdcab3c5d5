"""The distill task in two processes (torchrun, gloo on CPU) with the cached teacher top-k gives
the same losses, gradient norms and weights as one process with accumulation: every term is a
sum over the step's trained positions divided by their count over micro-batches and processes."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ..conftest import TINY_LLAMA, free_port, train_config
from .test_distributed import run, steps


def terms() -> list[dict]:
    from losslab.losses.registry import LOSSES

    found = [{"name": "token_cross_entropy", "label_smoothing": 0.1}]
    if "distillation" in LOSSES:
        found.append({"name": "distillation", "divergence": "forward_kl", "weight": 0.5})
    return found


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.prefix) / "bin" / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_two_processes_equal_one_with_accumulation(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for out, batch_size, accum in ((one, 2, 2), (two, 1, 2)):  # 2 x 2 = 1 x 2 x 2 processes
        data = train_config(
            out,
            task="distill",
            distill={
                "teacher": TINY_LLAMA,
                "student": {"init_from": "teacher", "keep_layers": [1]},
                "top_k": 8,
                "cache": True,
            },
            data={"max_train_samples": 16},
            loss={"terms": terms()},
            training={"max_steps": 3, "batch_size": batch_size, "grad_accum": accum, "lr": 1e-3, "save_steps": 100},
        )
        del data["model"]
        (tmp_path / f"{out.name}.yaml").write_text(yaml.safe_dump(data))
    run([sys.executable, "-m", "losslab.cli", "train", "one.yaml"], tmp_path)
    torchrun = str(Path(sys.prefix) / "bin" / "torchrun")
    port = str(free_port())
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", port, "-m", "losslab.cli", "train", "two.yaml"]
    run(cmd, tmp_path)
    a, b = steps(one), steps(two)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in [k for k in x if k == "loss" or k.startswith("loss/")]:
            assert y[key] == pytest.approx(x[key], rel=1e-5), key
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
