"""The embedding task in two processes (torchrun, gloo on CPU): InfoNCE with
``gather_across_devices`` (its default) gives 2 processes x 2 pairs the loss, the gradients and
the weights of 1 process x 4 pairs; the same term without the gather, logged alongside, is the
weaker loss of each process's own 2 pairs."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from ..conftest import free_port, train_config
from .test_distributed import run, steps

# `losslab train` with one more Trainer callback: the first step's gradients (after DDP's
# all-reduce, before the optimizer) saved by the first process
_WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import TrainerCallback
    from losslab.train import trainer as losslab_trainer

    class SaveGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if state.global_step == 0 and state.is_world_process_zero:
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
                torch.save(grads, sys.argv[2])

    init = losslab_trainer.LosslabTrainer.__init__

    def with_callback(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(SaveGradients())

    losslab_trainer.LosslabTrainer.__init__ = with_callback
    from losslab.cli import main

    sys.exit(main(["train", sys.argv[1]]))
    """
)


class SaveGradients(TrainerCallback):
    """The first step's gradients, as the worker script's callback."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw) -> None:
        if state.global_step == 0 and state.is_world_process_zero:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            torch.save(grads, self.path)


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.prefix) / "bin" / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_two_processes_with_gathered_negatives_equal_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "worker.py").write_text(_WORKER)
    one, two = tmp_path / "one", tmp_path / "two"
    for out, batch_size in ((one, 4), (two, 2)):  # 2 x 2 = the same global batch
        data = train_config(
            out,
            task="embedding",
            data={"max_train_samples": 8, "max_length": 32},
            embedding={"negatives": True},
            loss={
                "terms": [
                    {"name": "info_nce", "temperature": 0.05},  # gather_across_devices: true by default
                    {"name": "info_nce", "temperature": 0.05, "gather_across_devices": False, "label": "local"},
                ]
            },
            # max_grad_norm 0: the saved gradients are the raw ones
            training={"max_steps": 2, "batch_size": batch_size, "lr": 1e-3, "save_steps": 100, "max_grad_norm": 0},
        )
        data["loss"]["terms"][1]["weight"] = 0.0  # logged, not trained
        (tmp_path / f"{out.name}.yaml").write_text(yaml.safe_dump(data))
    # one process: in this one (a fresh interpreter would cost its imports again)
    from losslab.train import trainer as losslab_trainer
    from losslab.train.config import TrainConfig
    from losslab.train.run import train

    init = losslab_trainer.LosslabTrainer.__init__

    def with_callback(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        self.add_callback(SaveGradients(tmp_path / "one.pt"))

    monkeypatch.setattr(losslab_trainer.LosslabTrainer, "__init__", with_callback)
    train(TrainConfig.model_validate(yaml.safe_load((tmp_path / "one.yaml").read_text())))
    torchrun = str(Path(sys.prefix) / "bin" / "torchrun")
    port = str(free_port())
    run([torchrun, "--nproc_per_node", "2", "--master_port", port, "worker.py", "two.yaml", "two.pt"], tmp_path)
    a, b = steps(one), steps(two)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):  # the second step runs on the weights after one update
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["loss/info_nce"] == pytest.approx(x["loss/info_nce"], rel=1e-5)
        assert x["loss/local"] == pytest.approx(x["loss/info_nce"], rel=1e-6)  # one process: nothing to gather
        assert y["loss/local"] < y["loss/info_nce"] - 0.05  # 3 negatives per query instead of 7: weaker
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    ga, gb = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert ga.keys() == gb.keys() and len(ga) > 0
    for name in ga:  # float32 sums in another order (gloo's all-reduce): 1e-5 of the tensor's largest gradient
        scale = float(ga[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(
            gb[name],
            ga[name],
            rtol=1e-4,
            atol=1e-5 * scale,
            msg=lambda m, name=name, scale=scale: f"{name} (max {scale:.3g}): {m}",
        )
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:  # AdamW: see tests/train/test_distributed.py for the tolerance
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert json.loads((two / "summary.json").read_text())["negatives"] is True
