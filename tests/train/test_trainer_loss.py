"""The Trainer adapter: exact normalisation under accumulation, logged terms, schedules, fused head."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from transformers import TrainingArguments

from losslab.losses.registry import build_composite
from losslab.models import load_causal_lm
from losslab.train.adapter import LossAdapter
from losslab.train.next_token import causal_lm_loss
from losslab.train.trainer import JsonlLogCallback, LosslabTrainer, LossTermsCallback

LENGTHS = [5, 11, 3, 8]  # uneven on purpose


def samples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, 2000, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 2] = -100  # a "prompt"
        weights = torch.rand(n, generator=g) + 0.5
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "weights": weights.tolist()})
    return out


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(b["input_ids"]) for b in batch)

    def pad(key: str, value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([b[key] + [value] * (width - len(b[key])) for b in batch], dtype=dtype)

    return {
        "input_ids": pad("input_ids", 2, torch.long),
        "labels": pad("labels", -100, torch.long),
        "weights": pad("weights", 0.0, torch.float32),
        "attention_mask": torch.tensor(
            [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        ),
    }


TERMS = [
    {"name": "token_cross_entropy", "label_smoothing": 0.1, "z_loss": 1e-3},
    {"name": "consistency", "weight": {"schedule": "linear", "start": 0.5, "end": 0.0, "total_steps": 4}},
]


def sparse_samples() -> list[dict]:
    """Uneven samples where some rows have no trained next-token target: one fully masked,
    one trained only at position 0 (nothing left after the shift)."""
    out = samples(1)
    out[1]["labels"] = [-100] * len(out[1]["labels"])
    out[2]["labels"] = [out[2]["input_ids"][0]] + [-100] * (len(out[2]["labels"]) - 1)
    return out


def trained_rows(data: list[dict]) -> int:
    return sum(any(x != -100 for x in s["labels"][1:]) for s in data)


def loss_and_grads(micro_batches: list[list[dict]], fused: bool, terms=TERMS) -> tuple[float, list[torch.Tensor]]:
    model = load_causal_lm("builtin:tiny-llama", dtype="float64")
    lf = causal_lm_loss(build_composite(terms), fused=fused, model=model)
    total_items = sum(sum(1 for x in s["labels"][1:] if x != -100) for mb in micro_batches for s in mb)
    lf.num_sequences = trained_rows([s for mb in micro_batches for s in mb])  # what LosslabTrainer counts
    model.train()  # num_sequences is a training-step count (no dropout in the tiny model)
    total = 0.0
    for mb in micro_batches:
        loss = lf.compute_loss(model, collate(mb), num_items_in_batch=torch.tensor(total_items))
        loss.backward()
        total += float(loss.detach())
    return total, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("reduction", ["mean", "sequence"])
@pytest.mark.parametrize("fused", [False, True])
def test_accumulation_1x4_equals_4x1(fused: bool, reduction: str) -> None:
    terms = [{**TERMS[0], "reduction": reduction}]  # token CE: the term defined as a sum over tokens (or rows)
    data = samples() if reduction == "mean" else sparse_samples()
    loss_a, grads_a = loss_and_grads([data], fused, terms)
    loss_b, grads_b = loss_and_grads([[s] for s in data], fused, terms)
    assert loss_a == pytest.approx(loss_b, rel=1e-10)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def first_step(
    data: list[dict], batch_size: int, grad_accum: int, fused: bool, tmp_path, terms: list[dict] | None = None
) -> tuple[float, list[torch.Tensor], LossAdapter]:
    """One optimizer step of the real Trainer over ``data``: the logged loss, the gradients
    before the update, and the loss function (with the ``num_sequences`` the Trainer gave it)."""
    from transformers import TrainerCallback

    grads: list[torch.Tensor] = []

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.extend(p.grad.clone() for p in model.parameters())

    torch.manual_seed(0)
    model = load_causal_lm("builtin:tiny-llama", dtype="float64")
    lf = causal_lm_loss(
        build_composite(terms or [{"name": "token_cross_entropy", "reduction": "sequence"}]), fused=fused, model=model
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / f"{batch_size}x{grad_accum}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = LosslabTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collate,
        loss_func=lf,
        callbacks=[LossTermsCallback(lf), Grads()],
    )
    trainer.train()
    loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    return loss, grads, lf


@pytest.mark.parametrize("fused", [False, True])
def test_trainer_sequence_reduction_accumulation_invariant(fused: bool, tmp_path) -> None:
    """``sequence`` reduction on the real Trainer: batch 1 x 4 accumulation and 2 x 2 equal 4 x 1
    (loss and gradients), and the loss is the mean over the rows with a trained target of each
    row's mean token loss, computed here by hand (a per-micro-batch mean would give 2/4 of it)."""
    data = sparse_samples()
    assert trained_rows(data) == 2
    loss_ref, grads_ref, lf = first_step(data, 4, 1, fused, tmp_path)
    assert int(lf.num_sequences) == 2
    model = load_causal_lm("builtin:tiny-llama", dtype="float64")
    batch = collate(data)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    per_token = per_token * batch["weights"][:, 1:]  # the collator's token weights reach the loss
    rows = (labels != -100).any(dim=-1)
    by_hand = (per_token.sum(-1)[rows] / (labels != -100).sum(-1)[rows]).mean()
    assert loss_ref == pytest.approx(float(by_hand), rel=1e-5)
    for batch_size, grad_accum in [(1, 4), (2, 2)]:
        loss, grads, lf = first_step(data, batch_size, grad_accum, fused, tmp_path)
        assert int(lf.num_sequences) == 2
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        assert len(grads) == len(grads_ref)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_trainer_consistency_term_accumulation_invariant(tmp_path) -> None:
    """The ``consistency`` term on the real Trainer: the step's adjacent trained pairs are
    counted over its micro-batches (``num_pairs``), so 1 x 4 and 2 x 2 equal 4 x 1 (loss and
    gradients), and the term is the mean over every pair of the step, by hand below (a
    per-micro-batch mean, as before, differed by about 1e-3)."""
    terms = [{"name": "token_cross_entropy"}, {"name": "consistency", "weight": 0.5}]
    data = samples()
    loss_ref, grads_ref, lf = first_step(data, 4, 1, False, tmp_path, terms)
    batch = collate(data)
    trained = batch["labels"][:, 1:] != -100
    pairs = trained[:, :-1] & trained[:, 1:]
    assert int(lf.num_pairs) == int(pairs.sum()) > 0
    model = load_causal_lm("builtin:tiny-llama", dtype="float64")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    from losslab.losses.dialogue import consistency_loss

    by_hand = float(consistency_loss(logits, trained))  # the mean over the pairs of the whole batch
    labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    token_ce = float((per_token * batch["weights"][:, 1:]).sum() / trained.sum())
    assert loss_ref == pytest.approx(token_ce + 0.5 * by_hand, rel=1e-6)
    for batch_size, grad_accum in [(1, 4), (2, 2)]:
        loss, grads, lf = first_step(data, batch_size, grad_accum, False, tmp_path, terms)
        assert int(lf.num_pairs) == int(pairs.sum())
        assert loss == pytest.approx(loss_ref, rel=1e-6)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    per_micro = [
        float(consistency_loss(logits[i : i + 1], trained[i : i + 1])) for i in range(len(data)) if pairs[i].any()
    ]
    assert by_hand != pytest.approx(sum(per_micro) / len(data), rel=1e-4)  # what a per-micro-batch mean gives


@pytest.mark.parametrize("fused", [False, True])
def test_a_training_forward_keeps_no_kv_cache(fused: bool) -> None:
    """Llama's config says use_cache: the training forward asks for none (no K/V of every layer
    held until backward); evaluation keeps the model's default."""
    model = load_causal_lm("builtin:tiny-llama", dtype="float64")
    assert model.config.use_cache
    lf = causal_lm_loss(build_composite(TERMS[:1]), fused=fused, model=model)
    seen: list[Any] = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True)
    outputs: list[Any] = []
    model.register_forward_hook(lambda mod, args, out: outputs.append(out.past_key_values))
    batch = collate(samples()[:2])
    model.train()
    lf.compute_loss(model, batch, num_items_in_batch=torch.tensor(10))
    model.eval()
    with torch.no_grad():
        lf.compute_loss(model, batch)
    assert seen == [False, None]
    assert outputs[0] is None and outputs[1] is not None  # the cache the eval forward builds, by default


def test_fused_equals_logits_path() -> None:
    data = [samples()]
    loss_a, grads_a = loss_and_grads(data, fused=False, terms=TERMS[:1])
    loss_b, grads_b = loss_and_grads(data, fused=True, terms=TERMS[:1])
    assert loss_a == pytest.approx(loss_b, rel=1e-9)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_trainer_logs_every_term_and_advances_schedules(tmp_path, grad_accum: int) -> None:
    """Under accumulation too, the logged loss is the weighted sum of the logged terms."""
    torch.manual_seed(0)
    model = load_causal_lm("builtin:tiny-llama")
    lf = causal_lm_loss(build_composite(TERMS), fused=False, model=model)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2 // grad_accum,
        gradient_accumulation_steps=grad_accum,
        max_steps=4,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = LosslabTrainer(
        model=model,
        args=args,
        train_dataset=samples() * 2,
        data_collator=collate,
        loss_func=lf,
        callbacks=[LossTermsCallback(lf), JsonlLogCallback(tmp_path / "log.jsonl")],
    )
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/token_cross_entropy" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["weight/consistency"] for r in steps] == pytest.approx([0.5, 0.375, 0.25, 0.125])
    assert all(r["loss/consistency"] >= 0 for r in steps)
    for r in steps:  # the Trainer's loss is the weighted sum of the logged parts
        expected = r["loss/token_cross_entropy"] + r["weight/consistency"] * r["loss/consistency"]
        assert r["loss"] == pytest.approx(expected, rel=1e-4)
    assert steps[-1]["loss/token_cross_entropy"] < steps[0]["loss/token_cross_entropy"]


def test_an_epochs_last_short_accumulation_window_counts_per_batch_terms_once(tmp_path) -> None:
    """3 samples, batch 1, accumulation 2: step 1 has two micro-batches, step 2 one. At lr 0 the
    weights do not move, so an L2 penalty counted once per optimizer step gives the same logged
    value and the same gradient at both steps (the Trainer's default share 1/2 halved step 2)."""
    from transformers import TrainerCallback

    norms: list[float] = []

    class GradNorm(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            norms.append(float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))))

    torch.manual_seed(0)
    model = load_causal_lm("builtin:tiny-llama")
    lf = causal_lm_loss(build_composite([{"name": "l2"}]), fused=False, model=model)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        num_train_epochs=1,
        learning_rate=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = LosslabTrainer(
        model=model,
        args=args,
        train_dataset=samples()[:3],
        data_collator=collate,
        loss_func=lf,
        callbacks=[LossTermsCallback(lf), JsonlLogCallback(tmp_path / "log.jsonl"), GradNorm()],
    )
    trainer.train()
    rows = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "loss/l2" in r]
    assert [r["step"] for r in rows] == [1, 2] and len(norms) == 2
    l2 = 0.5 * sum(float((p.detach().double() ** 2).sum()) for p in model.parameters())
    assert rows[0]["loss/l2"] == pytest.approx(l2, rel=1e-5)
    assert rows[1]["loss/l2"] == pytest.approx(rows[0]["loss/l2"], rel=1e-6)
    assert norms[1] == pytest.approx(norms[0], rel=1e-6)


def test_item_count_is_over_shifted_targets_whatever_the_model_class(tmp_path) -> None:
    """``num_items_in_batch`` counts next-token targets (labels[:, 1:]) for any causal LM: the
    Trainer does so only for ``*ForCausalLM`` classes, and GPT2LMHeadModel is not one."""
    from transformers import GPT2Config, GPT2LMHeadModel

    data = [{**s, "labels": list(s["input_ids"])} for s in samples()]  # every token trained (mask: all)
    targets = sum(len(s["labels"]) - 1 for s in data)
    seen: list[int] = []

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=2000, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    lf = causal_lm_loss(build_composite([{"name": "token_cross_entropy"}]), fused=False, model=model)
    evaluate = lf.evaluate

    def spy(inputs, num_items_in_batch=None, **kw):
        seen.append(int(num_items_in_batch))
        return evaluate(inputs, num_items_in_batch, **kw)

    lf.evaluate = spy
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    LosslabTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collate,
        loss_func=lf,
        callbacks=[LossTermsCallback(lf)],
    ).train()
    assert seen == [targets]


def test_the_fused_head_is_refused_for_models_that_cap_or_scale_their_logits() -> None:
    """Gemma-2 soft-caps its logits, Cohere and Granite scale them: the fused head (h @ W.T)
    would train another loss than the model's, so losslab detects it (Llama's head is linear)."""
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from losslab.train.next_token import lm_head_gives_logits

    common = {
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    torch.manual_seed(0)
    models = {
        "llama": (LlamaForCausalLM(LlamaConfig(**common)), True),
        "gemma2": (Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, final_logit_softcapping=5.0)), False),
        "cohere": (CohereForCausalLM(CohereConfig(**common, logit_scale=0.0625)), False),
        "granite": (GraniteForCausalLM(GraniteConfig(**common, logits_scaling=8.0)), False),
    }
    ids = torch.randint(3, 300, (2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    for name, (model, linear) in models.items():
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(30)  # logits of a trained model's size, where capping bites
        model.train()
        assert lm_head_gives_logits(model) is linear, name
        assert model.training, name  # the check puts the model back in training mode
        if not linear:  # the fused head's loss differs from the model's own, which the logits path matches
            model.eval()
            with torch.no_grad():
                own = model(input_ids=ids, labels=labels).loss
                for fused in (False, True):
                    lf = causal_lm_loss(build_composite([{"name": "token_cross_entropy"}]), fused=fused, model=model)
                    out = model(input_ids=ids, output_hidden_states=True)
                    loss = lf(out, labels)
                    assert (float(loss) == pytest.approx(float(own), rel=1e-5)) is not fused, (name, fused)
