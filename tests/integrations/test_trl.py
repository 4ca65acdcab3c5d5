"""losslab's loss, masks and collator inside TRL's SFTTrainer (the pinned trl extra): the first
step's loss and gradients equal ``losslab train``'s on the same data, with the plain head and the
fused one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from losslab.audit.one_step import trainer_step
from losslab.audit.setup import build_setup
from losslab.integrations import collator, loss_func, sft_dataset
from losslab.models import load_causal_lm, load_tokenizer
from losslab.train.config import TrainConfig
from losslab.train.run import train

from ..conftest import CHATTERBOT, TINY_LLAMA, train_config

trl = pytest.importorskip("trl")

TERMS = [{"name": "token_cross_entropy", "label_smoothing": 0.1, "z_loss": 1e-3}, {"name": "l2", "weight": 1e-4}]
B = 4


def sft_first_step(tmp_path: Path, *, fused: bool) -> tuple[float, float, dict[str, torch.Tensor]]:
    """One SFTTrainer step on the first B records: its logged loss, the gradients' norm and the gradients."""
    from transformers import TrainerCallback

    tokenizer = load_tokenizer(TINY_LLAMA)
    model = load_causal_lm(TINY_LLAMA, dtype="float64")
    grads: dict[str, torch.Tensor] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    loss = loss_func(TERMS, model=model, fused=fused)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / f"sft-{fused}"),
        per_device_train_batch_size=B,
        max_steps=1,
        learning_rate=3e-3,
        max_grad_norm=0.0,  # the callback sees the gradients after clipping: none
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(CHATTERBOT, tokenizer, max_length=48, limit=B),
        data_collator=collator(tokenizer, hidden_states=fused),
        processing_class=tokenizer,
        compute_loss_func=loss,
        callbacks=[loss.callback(), Capture()],
    )
    trainer.train()
    row = next(r for r in trainer.state.log_history if "loss" in r)
    return row["loss"], float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))), grads


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sft_trainer_first_step_equals_losslab_train(tmp_path: Path) -> None:
    data = train_config(
        tmp_path / "run",
        data={"max_train_samples": B},
        loss={"terms": TERMS},
        training={"max_steps": 1, "batch_size": B, "lr": 3e-3},
        dtype="float64",
    )
    config = TrainConfig.model_validate(data)
    train(config)
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    # losslab train's loss path (LosslabTrainer), its gradients captured before the optimizer
    reference = trainer_step(
        (setup := build_setup(config, B)).run.model, setup.samples, setup.padded, setup.adapter(), batch_size=B
    )
    assert reference.loss == pytest.approx(logged["loss"], rel=1e-6)
    assert reference.grad_norm == pytest.approx(logged["grad_norm"], rel=1e-6)
    for fused in (False, True):
        loss, grad_norm, grads = sft_first_step(tmp_path, fused=fused)
        assert loss == pytest.approx(logged["loss"], rel=1e-6)
        assert grad_norm == pytest.approx(logged["grad_norm"], rel=1e-6)
        assert grads.keys() == reference.grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(
                g, reference.grads[name], rtol=1e-6, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}"
            )
