"""losslab's loss, masks and collator inside TRL's SFTTrainer (the pinned trl extra) and a plain
``transformers.Trainer``: the first step's loss and gradients equal ``losslab train``'s on the same
data, with the plain head and the fused one; through ``compute_loss_func`` (deprecated by TRL
1.16) and through the subclass path (``losslab_trainer``), which also takes token weights and
asks the fused head's model for no logits."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from losslab.audit.one_step import Step, trainer_step
from losslab.audit.setup import build_setup
from losslab.errors import UserError
from losslab.integrations import LosslabSFTTrainer, collator, loss_func, losslab_trainer, sft_dataset
from losslab.integrations.trainer import sft_trainer_class
from losslab.models import load_causal_lm, load_tokenizer
from losslab.train.config import TrainConfig
from losslab.train.run import train
from losslab.train.trainer import LosslabLossMixin

from ..conftest import CHATTERBOT, TINY_LLAMA, train_config

trl = pytest.importorskip("trl")

TERMS = [{"name": "token_cross_entropy", "label_smoothing": 0.1, "z_loss": 1e-3}, {"name": "l2", "weight": 1e-4}]
B = 4
# user turns trained at a quarter of the assistant's weight: the loss differs from the unweighted one
WEIGHTED = {"mask": "all", "role_weights": {"user": 0.25, "assistant": 1.0}}


def reference_step(out: Path, data: dict[str, Any]) -> Step:
    """``losslab train``'s first step on the first B records (its logged loss and gradient norm are
    checked against the step of its loss path, LosslabTrainer, whose gradients are returned)."""
    config = TrainConfig.model_validate(
        train_config(
            out,
            data={"max_train_samples": B, **data},
            loss={"terms": TERMS},
            training={"max_steps": 1, "batch_size": B, "lr": 3e-3},
            dtype="float64",
        )
    )
    train(config)
    logged = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    setup = build_setup(config, B)
    step = trainer_step(setup.run.model, setup.samples, setup.padded, setup.adapter(), batch_size=B)
    assert step.loss == pytest.approx(logged["loss"], rel=1e-6)
    assert step.grad_norm == pytest.approx(logged["grad_norm"], rel=1e-6)
    return step


@pytest.fixture(scope="module")
def plain_reference(tmp_path_factory: pytest.TempPathFactory) -> Step:
    return reference_step(tmp_path_factory.mktemp("plain"), {})


@pytest.fixture(scope="module")
def weighted_reference(tmp_path_factory: pytest.TempPathFactory) -> Step:
    return reference_step(tmp_path_factory.mktemp("weighted"), WEIGHTED)


@dataclass
class FirstStep:
    """One step of an integration trainer: its logged loss, the gradients before the optimizer,
    the number of positions the LM head was applied to at each call, and the warnings raised."""

    loss: float
    grads: dict[str, torch.Tensor]
    head_positions: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def first_step(
    tmp_path: Path, trainer: str, *, fused: bool, data: dict[str, Any] | None = None, accumulation: int = 1
) -> FirstStep:
    """One step of ``trainer`` on the first B records (B / ``accumulation`` rows x ``accumulation``
    micro-batches): "compute_loss_func" (SFTTrainer with losslab's loss as its compute_loss_func),
    "sft" (LosslabSFTTrainer) or "plain" (losslab_trainer(Trainer))."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tokenizer = load_tokenizer(TINY_LLAMA)
    model = load_causal_lm(TINY_LLAMA, dtype="float64")
    result = FirstStep(0.0, {})

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            result.grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    # the positions the LM head is applied to: B x T for the model's own logits
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: result.head_positions.append(out.shape[:-1].numel())
    )
    loss = loss_func(TERMS, model=model, fused=fused)
    common = {
        "output_dir": str(tmp_path / f"{trainer}-{fused}"),
        "per_device_train_batch_size": B // accumulation,
        "gradient_accumulation_steps": accumulation,
        "max_steps": 1,
        "learning_rate": 3e-3,
        "max_grad_norm": 0.0,  # the callback sees the gradients after clipping: none
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "disable_tqdm": True,
    }
    weights = trainer != "compute_loss_func"  # the subclass path takes token weights
    dataset = sft_dataset(CHATTERBOT, tokenizer, max_length=48, limit=B, weights=weights, **(data or {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if trainer == "compute_loss_func":
            run = trl.SFTTrainer(
                model=model,
                args=trl.SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True}),
                train_dataset=dataset,
                data_collator=collator(tokenizer, hidden_states=fused),
                processing_class=tokenizer,
                compute_loss_func=loss,
                callbacks=[loss.callback(), Capture()],
            )
        elif trainer == "sft":
            run = LosslabSFTTrainer(
                model=model,
                args=trl.SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True}),
                train_dataset=dataset,
                data_collator=collator(tokenizer, weights=True),
                processing_class=tokenizer,
                losslab_loss=loss,  # its callback is added by the trainer
                callbacks=[Capture()],
            )
        elif trainer == "mixin":  # written out by hand, as docs/integrations.md shows

            class MyTrainer(LosslabLossMixin, Trainer):
                pass

            run = MyTrainer(
                model=model,
                args=TrainingArguments(**common),  # remove_unused_columns on: the mixin keeps `weights`
                train_dataset=dataset,
                data_collator=collator(tokenizer, weights=True),
                processing_class=tokenizer,
                loss_func=loss,
                callbacks=[loss.callback(), Capture()],
            )
        else:
            run = losslab_trainer(Trainer)(
                model=model,
                args=TrainingArguments(**common),  # remove_unused_columns stays on: it keeps `weights`
                train_dataset=dataset,
                data_collator=collator(tokenizer, weights=True),
                processing_class=tokenizer,
                losslab_loss=loss,
                callbacks=[Capture()],
            )
        run.train()
    result.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
    result.loss = next(r for r in run.state.log_history if "loss" in r)["loss"]
    return result


def assert_same_step(step: FirstStep, reference: Step) -> None:
    assert step.loss == pytest.approx(reference.loss, rel=1e-6)
    assert step.grads.keys() == reference.grads.keys()
    for name, g in step.grads.items():
        torch.testing.assert_close(g, reference.grads[name], rtol=1e-6, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def deprecation_warnings(step: FirstStep) -> list[str]:
    return [w for w in step.warnings if w.startswith("FutureWarning") and "compute_loss_func" in w]


def test_compute_loss_func_first_step_equals_losslab_train(tmp_path: Path, plain_reference: Step) -> None:
    for fused in (False, True):
        step = first_step(tmp_path, "compute_loss_func", fused=fused)
        assert_same_step(step, plain_reference)
        assert deprecation_warnings(step)  # TRL 1.16's: what the subclass path avoids


def test_sft_subclass_first_step_equals_losslab_train(tmp_path: Path, plain_reference: Step) -> None:
    for fused in (False, True):
        # the fused run in 2 micro-batches of 2 (the l2 term counts once per step, tokens over the step)
        step = first_step(tmp_path, "sft", fused=fused, accumulation=2 if fused else 1)
        assert_same_step(step, plain_reference)
        assert deprecation_warnings(step) == []
        if fused:
            # the model was asked for no logits: the LM head ran over no position
            assert step.head_positions and set(step.head_positions) == {0}
        else:
            assert max(step.head_positions) > 0


def test_sft_subclass_takes_token_weights(tmp_path: Path, plain_reference: Step, weighted_reference: Step) -> None:
    assert weighted_reference.loss != pytest.approx(plain_reference.loss, rel=1e-3)  # the weights matter
    step = first_step(tmp_path, "sft", fused=True, data=WEIGHTED)
    assert_same_step(step, weighted_reference)


@pytest.mark.parametrize("trainer", ["plain", "mixin"])
def test_plain_trainer_subclass_takes_token_weights(tmp_path: Path, weighted_reference: Step, trainer: str) -> None:
    step = first_step(tmp_path, trainer, fused=False, data=WEIGHTED)
    assert_same_step(step, weighted_reference)
    assert deprecation_warnings(step) == []


def test_weights_are_refused_on_the_compute_loss_func_path() -> None:
    tokenizer = load_tokenizer(TINY_LLAMA)
    with pytest.raises(UserError, match="weights=True"):
        sft_dataset(CHATTERBOT, tokenizer, max_length=48, limit=2, **WEIGHTED)
    dataset = sft_dataset(CHATTERBOT, tokenizer, max_length=48, limit=2, weights=True, **WEIGHTED)
    with pytest.raises(UserError, match="weights=True"):
        collator(tokenizer)(list(dataset))
    assert collator(tokenizer, weights=True)(list(dataset))["weights"].shape == (2, 48)
    unweighted = [{k: v for k, v in row.items() if k != "weights"} for row in dataset]  # a dropped column
    with pytest.raises(UserError, match="without token weights"):
        collator(tokenizer, weights=True)(unweighted)
    assert "weights" not in sft_dataset(CHATTERBOT, tokenizer, max_length=48, limit=2).column_names


def test_subclass_refuses_compute_loss_func() -> None:
    with pytest.raises(UserError, match="compute_loss_func"):
        LosslabSFTTrainer(model=None, losslab_loss=loss_func(), compute_loss_func=loss_func())


def test_missing_trl_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'losslab\[trl\]'"):
        sft_trainer_class()
