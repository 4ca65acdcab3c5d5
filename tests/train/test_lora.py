"""LoRA adapters (PEFT) and gradient checkpointing on the tiny Llama: the config's two spellings
and its checks before any data or weight, only adapters train, the fused head's frozen-weight
path equal to the plain head, a real run whose base weights stay bit-identical and whose saved
adapter (and merged model) reload to the same logits, resume, the preference reference with
adapters disabled, and gradient checkpointing equal to no checkpointing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import losslab.train.run as run_module
from losslab.config import load_config, validate
from losslab.errors import UserError
from losslab.losses.registry import build_composite
from losslab.models import load_causal_lm
from losslab.train.config import LoraConfig, TrainConfig
from losslab.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MERGED_DIR,
    AdaptersDisabled,
    enable_gradient_checkpointing,
    with_lora,
)
from losslab.train.next_token import causal_lm_loss
from losslab.train.run import train

from ..conftest import TINY_LLAMA, train_config

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def lora_config(out: Path | None, lora: dict | None = None, **fields: Any) -> dict:
    return train_config(out, model={"name": TINY_LLAMA, "lora": lora or LORA}, **fields)


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def tiny(dtype: str = "float64") -> torch.nn.Module:
    return load_causal_lm(TINY_LLAMA, dtype=dtype)


def randomised(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-zero B matrices (PEFT starts them at 0, which gives A no gradient and changes nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model


def batch(vocab: int, *, rows: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def base_name(name: str) -> str:
    """A PEFT model's parameter name -> the base model's."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


# ---- the config -------------------------------------------------------------------------------------


def test_model_as_a_mapping_is_model_plus_a_lora_section(tmp_path: Path) -> None:
    config = TrainConfig.model_validate(lora_config(tmp_path / "run"))
    assert config.model == TINY_LLAMA and config.lora == LoraConfig(**LORA)
    flat = TrainConfig.model_validate({**lora_config(tmp_path / "run"), "model": TINY_LLAMA, "lora": LORA})
    assert flat == config
    # the resolved config (config.yaml) reads back the same
    assert TrainConfig.model_validate(config.model_dump(mode="json")) == config
    plain = TrainConfig.model_validate(train_config(tmp_path / "run"))
    assert plain.model == TINY_LLAMA and plain.lora is None


def test_set_overrides_work_with_both_spellings(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(train_config(tmp_path / "run")))
    config = load_config(TrainConfig, path, ["model=builtin:smollm2-135m-instruct", "lora.r=2"])
    assert config.model == "builtin:smollm2-135m-instruct" and config.lora is not None and config.lora.r == 2
    path.write_text(yaml.safe_dump(lora_config(tmp_path / "run")))
    config = load_config(TrainConfig, path, ["model.lora.r=16", "model.name=builtin:smollm2-135m-instruct"])
    assert config.model == "builtin:smollm2-135m-instruct" and config.lora is not None and config.lora.r == 16


def test_bad_lora_settings_name_their_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    data = lora_config(tmp_path / "run", lora={"r": 0, "target_modules": []})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(UserError) as err:
        load_config(TrainConfig, path)
    message = str(err.value)
    assert re.search(r"run\.yaml:\d+: field 'model\.lora\.r': Input should be greater than or equal to 1", message)
    assert "field 'model.lora.target_modules'" in message and "an empty list" in message
    with pytest.raises(UserError, match="LoRA given twice"):
        validate(TrainConfig, {**lora_config(tmp_path / "run"), "lora": LORA}, source="x.yaml")
    with pytest.raises(UserError, match="LoRA adapters are for the causal-LM tasks"):
        validate(TrainConfig, lora_config(tmp_path / "run", task="sequence_classification"), source="x.yaml")


def test_unknown_or_lm_head_targets_fail_before_any_data_or_weight(tmp_path: Path, no_model: None) -> None:
    missing_data = {"train": str(tmp_path / "absent.jsonl")}  # read only after the check
    bad = TrainConfig.model_validate(
        lora_config(tmp_path / "a", lora={"target_modules": ["q_proj", "qkv", "attn"]}, data=missing_data)
    )
    with pytest.raises(UserError) as err:
        train(bad)
    message = str(err.value)
    assert "'qkv', 'attn' match no module of LlamaForCausalLM" in message
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in message
    assert "lora.target_modules" in message
    head = TrainConfig.model_validate(lora_config(tmp_path / "b", lora={"target_modules": ["lm_head"]}))
    with pytest.raises(UserError, match="'lm_head' is the LM head; LoRA on the LM head is not supported"):
        train(head)
    # `losslab train` names the file, line and field
    from argparse import Namespace

    from losslab.train.command import run_train

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(lora_config(tmp_path / "c", lora={"target_modules": ["qkv"]}), sort_keys=False))
    with pytest.raises(UserError, match=r"run\.yaml:\d+: field 'model\.lora\.target_modules': 'qkv' matches no"):
        run_train(Namespace(config=str(path), overrides=[]))


# ---- adapters only, the fused head's frozen-weight path --------------------------------------------


def test_only_adapters_train_and_the_fused_head_equals_the_plain_head(monkeypatch: pytest.MonkeyPatch) -> None:
    import losslab.losses.fused as fused_module

    model = randomised(with_lora(tiny(), LoraConfig(**LORA)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(n) for n in trainable)
    head = model.get_output_embeddings()
    assert head is not None and not head.weight.requires_grad
    anchored = causal_lm_loss(build_composite([{"name": "l2_sp"}], total_steps=1), model=model)
    assert anchored.reference_params is not None and set(anchored.reference_params) == set(trainable)

    asked: list[bool] = []
    real_pass = fused_module._head_pass

    def spy(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs["grad_weight"])
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(fused_module, "_head_pass", spy)
    composite = build_composite([{"name": "token_cross_entropy"}], total_steps=1)
    inputs = batch(head.weight.shape[0])
    results = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(composite, model=model, fused=fused).compute_loss(model, dict(inputs))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert head.weight.grad is None
        results[fused] = (loss.detach(), grads)
    assert asked and not any(asked)  # the fused head computed no weight gradient
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in results[True][1].values())
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ---- a real run --------------------------------------------------------------------------------------


def capture_trained(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, torch.Tensor]]:
    """The trained model's parameters when the run evaluates it (before a merge), by name; and
    the trainable ones under ``trainable``."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    real_trained_model = run_module.trained_model

    def capture(trainer: Any) -> torch.nn.Module:
        model = real_trained_model(trainer)
        seen["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["trainable"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return model

    monkeypatch.setattr(run_module, "trained_model", capture)
    return seen


def test_a_lora_run_keeps_the_base_and_saves_an_adapter_that_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    seen = capture_trained(monkeypatch)
    out = tmp_path / "run"
    training = {"lr": 3e-2, "gradient_checkpointing": True}
    train(
        TrainConfig.model_validate(lora_config(out, lora={**LORA, "merge": True}, validation=True, training=training))
    )
    fresh = dict(tiny("float32").named_parameters())
    for name, value in seen["params"].items():
        if not is_adapter(name):
            assert torch.equal(value, fresh[base_name(name)]), name  # bit-identical base weights
    assert set(seen["trainable"]) == {n for n in seen["params"] if is_adapter(n)}
    saved = load_file(str(out / "model" / ADAPTER_WEIGHTS))
    assert (out / "model" / ADAPTER_CONFIG).is_file() and saved and all(is_adapter(k) for k in saved)
    assert not (out / "model" / "model.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())["lora"]
    assert summary["r"] == LORA["r"] and "trainable of" in summary["trainable"]

    ids = batch(len(fresh["model.embed_tokens.weight"]))["input_ids"]
    trained = with_lora(tiny("float32"), LoraConfig(**LORA))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if is_adapter(name):
                p.copy_(seen["params"][name])
        expected = trained.eval()(input_ids=ids).logits
        base_logits = tiny("float32").eval()(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(tiny("float32"), str(out / "model")).eval()
        merged = load_causal_lm(str(out / MERGED_DIR)).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(expected, base_logits, atol=1e-4)  # the adapters learned something


@pytest.mark.slow  # two short runs: ~13 s on 2 busy cores
def test_a_lora_run_resumes_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    seen = capture_trained(monkeypatch)
    out = tmp_path / "run"
    config = TrainConfig.model_validate(lora_config(out, validation=True, training={"save_steps": 3, "lr": 3e-2}))
    train(config)
    first = seen.pop("trainable")
    for path in ("checkpoint-6", "model", "metrics.json"):  # as if killed after the step-3 checkpoint
        shutil.rmtree(out / path, ignore_errors=True)
        (out / path).unlink(missing_ok=True)
    capsys.readouterr()
    train(config)
    assert f"resuming from {out / 'checkpoint-3'}" in capsys.readouterr().out
    assert (out / "metrics.json").is_file() and (out / "model" / ADAPTER_WEIGHTS).is_file()
    assert seen["trainable"].keys() == first.keys()
    for name, value in seen["trainable"].items():
        torch.testing.assert_close(value, first[name], rtol=1e-5, atol=1e-7, msg=name)


# ---- the preference task: the reference is the policy with adapters disabled ------------------------


def preference_config(out: Path, reference: str, lora: dict | None) -> TrainConfig:
    data = {"train": "builtin:preference", "max_length": 48, "max_train_samples": 4, "max_eval_samples": 4}
    fields: dict[str, Any] = {"model": {"name": TINY_LLAMA, "lora": lora}} if lora else {}
    return TrainConfig.model_validate(
        train_config(
            out,
            task="preference",
            loss={"terms": [{"name": "preference", "loss_type": "sigmoid"}]},
            data=data,
            preference={"reference": reference},
            **fields,
        )
    )


def test_the_lora_reference_is_the_base_model_without_a_copy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from losslab.train.task import get_task, plan_loss
    from losslab.train.tasks.preference_forward import PreferenceForward, output_embeddings

    cfg = preference_config(tmp_path / "model", "model", LORA)
    run = get_task("preference").build(cfg, plan_loss(cfg))
    randomised(run.model)
    forward = run.forward
    assert isinstance(forward, PreferenceForward) and isinstance(forward.reference, AdaptersDisabled)
    assert forward.reference.model is run.model  # no second copy: the policy's own tensors
    policy_storage = {p.data_ptr() for p in run.model.parameters()}
    assert all(p.data_ptr() in policy_storage for p in forward.reference.parameters())
    feed = run.collator(run.train[:4])
    run.model.train()
    with_reference = forward.reference_columns(feed)
    assert run.model.training  # the reference pass left the policy's mode as it was
    base = tiny("float32").eval()
    plain = PreferenceForward(head=output_embeddings(base), unpaired=False, reference=base).reference_columns(feed)
    policy = forward(run.model, feed)
    for key, value in plain.items():
        torch.testing.assert_close(with_reference[key], value, rtol=0, atol=0)
    assert not torch.allclose(policy.chosen_logps.detach(), plain["ref_chosen_logps"], atol=1e-3)

    # the cache is keyed by the base model, not the adapters: a LoRA run and a full run share it
    fingerprints = []
    for name, lora in (("full", None), ("lora", LORA)):
        capsys.readouterr()
        cfg = preference_config(tmp_path / name, "cache", lora)
        get_task("preference").build(cfg, plan_loss(cfg))
        fingerprints.append(re.findall(r"cache entry (\w+)", capsys.readouterr().out))
    assert fingerprints[0] and fingerprints[0] == fingerprints[1]


# ---- gradient checkpointing ----------------------------------------------------------------------------


@pytest.mark.parametrize("adapters", [True, False], ids=["lora", "full"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(adapters: bool) -> None:
    composite = build_composite([{"name": "token_cross_entropy"}], total_steps=1)
    results = []
    for checkpointing in (False, True):
        model = tiny()
        torch.manual_seed(0)  # the same adapters A both times
        if adapters:
            model = randomised(with_lora(model, LoraConfig(**LORA)))
        if checkpointing:
            enable_gradient_checkpointing(model)
        calls: list[int] = []
        base = model.get_base_model() if adapters else model
        base.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_, seen=calls: seen.append(1))
        model.train()
        loss = causal_lm_loss(composite, model=model, fused=True).compute_loss(model, batch(49152))
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    assert grads0.keys() == grads1.keys() and all(g is not None for g in grads1.values())
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_a_study_compares_lora_settings_and_full_fine_tuning(tmp_path: Path) -> None:
    from losslab.compare.config import config_hash, load_study

    study = {
        "output_dir": str(tmp_path / "out"),
        "base": lora_config(None, validation=True),
        "variants": [
            {"name": "lora_r4"},
            {"name": "lora_r8_all", "overrides": {"model.lora.r": 8, "model.lora.target_modules": "all-linear"}},
            {"name": "full", "overrides": {"model.lora": None}},
        ],
        "seeds": [0],
        "metrics": [{"name": "validation/loss", "direction": "min"}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    loaded = load_study(path)
    configs = {v.name: loaded.check(v, 0) for v in loaded.config.variants}
    assert configs["lora_r4"].lora == LoraConfig(**LORA)
    assert configs["lora_r8_all"].lora is not None and configs["lora_r8_all"].lora.r == 8
    assert configs["lora_r8_all"].lora.target_modules == "all-linear"
    assert configs["full"].lora is None and configs["full"].model == TINY_LLAMA
    hashes = {config_hash(loaded.resolve(v, 0)) for v in loaded.config.variants}
    assert len(hashes) == 3
    # a target that matches nothing stops the study before its first run, naming the variant
    study["variants"].append({"name": "typo", "overrides": {"model.lora.target_modules": ["q_prj"]}})
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    with pytest.raises(UserError, match=r"study\.yaml:\d+ \(variant 'typo'\): field 'lora.target_modules'.*'q_prj'"):
        load_study(path)
