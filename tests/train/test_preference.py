"""The ``preference`` task on the tiny Llama: a real run end to end (every term and monitor value
in log.jsonl, every metric name in metrics.json), the trl #1962 trap (a cached reference gives
ln 2 at the first step, then the loss moves), batch x accumulation invariance, the cached
reference bit-equal to the on-the-fly one, a reference-free loss that loads no reference, KTO on
paired data, and the config error of a reference loss without a reference."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from losslab.errors import UserError
from losslab.train.config import TrainConfig
from losslab.train.run import train
from losslab.train.task import get_task, plan_loss
from losslab.train.tasks.preference_eval import METRICS
from losslab.train.tasks.preference_forward import MONITOR as STEP_MONITOR
from losslab.train.tasks.preference_reference import REFERENCE_FIELDS

from ..conftest import train_config

MONITOR = set(STEP_MONITOR)


def config(out: Path | None, **fields: Any) -> TrainConfig:
    data = {"train": "builtin:preference", "max_length": 48, "max_train_samples": 8, "max_eval_samples": 4}
    terms = fields.pop("loss", None)
    return TrainConfig.model_validate(
        train_config(
            out,
            task="preference",
            loss={"terms": terms} if terms is not None else None,
            data={**data, **fields.pop("data", {})},
            training={"max_steps": 2, "batch_size": 4, "lr": 1e-2, **fields.pop("training", {})},
            **fields,
        )
    )


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_dpo_trains_end_to_end_and_logs_every_term_and_monitor_value(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = config(
        out,
        data={"validation": "builtin:preference", "max_eval_samples": 4},
        loss=[
            {"name": "preference", "loss_type": "sigmoid", "beta": 0.1},
            {"name": "token_cross_entropy", "weight": 0.5},
        ],
        training={"max_steps": 3, "eval_steps": 3},
        eval={"splits": ["validation"], "generate": True, "generation_samples": 3, "max_new_tokens": 4},
    )
    metrics = train(cfg)
    steps = [r for r in rows(out) if "loss/preference" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert set(r) >= MONITOR, sorted(MONITOR - set(r))
        assert r["loss"] == pytest.approx(r["loss/preference"] + 0.5 * r["loss/token_cross_entropy"], rel=1e-5)
    # the trl #1962 trap: the cached reference is the policy at init, so sigmoid gives ln 2 and
    # zero rewards at the first step; after an update the loss moves
    assert steps[0]["loss/preference"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["rewards/chosen"] == 0 and steps[0]["rewards/margin"] == 0
    assert steps[1]["loss/preference"] != pytest.approx(math.log(2), abs=1e-4)
    evals = [r for r in rows(out) if "eval_loss" in r]
    assert evals and {f"eval_{k}" for k in MONITOR} <= set(evals[0])
    written = json.loads((out / "metrics.json").read_text())
    names = get_task("preference").metric_names(cfg)
    assert names <= set(written) and names <= set(metrics)
    assert -1 <= metrics["validation/reward"] <= 1 and math.isfinite(metrics["validation/kl"])
    generations = [json.loads(line) for line in (out / "generations_validation.jsonl").read_text().splitlines()]
    assert len(generations) == 3 and {"prompt", "reference", "hypothesis", "reward", "kl"} <= set(generations[0])
    predictions = (out / "predictions_validation.jsonl").read_text().splitlines()
    assert len(predictions) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"].startswith("cache") and summary["layout"] == "shared"


def test_batch_4_equals_batch_1_with_4_accumulation_steps(tmp_path: Path) -> None:
    weights = {}
    for name, batch, accum in (("a", 4, 1), ("b", 1, 4)):
        out = tmp_path / name
        train(
            config(
                out,
                loss=[{"name": "preference", "loss_type": "sigmoid"}, {"name": "token_cross_entropy", "weight": 0.1}],
                training={"max_steps": 1, "batch_size": batch, "grad_accum": accum, "lr": 1e-3, "save_steps": 100},
                preference={"reference": "model"},
                dtype="float64",
            )
        )
        weights[name] = (rows(out)[0], load_file(out / "model" / "model.safetensors"))
    (ra, wa), (rb, wb) = weights["a"], weights["b"]
    for key in ("loss", "loss/preference", "loss/token_cross_entropy", "grad_norm", "rewards/margin"):
        assert rb[key] == pytest.approx(ra[key], rel=1e-9, abs=1e-12), key
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-9, atol=1e-12)


def test_the_cached_reference_equals_the_on_the_fly_one_bit_for_bit(tmp_path: Path) -> None:
    batches = {}
    for mode in ("model", "cache"):
        cfg = config(tmp_path / mode, preference={"reference": mode})
        run = get_task("preference").build(cfg, plan_loss(cfg))
        batch = run.collator(run.train[:4])
        forward = run.forward
        if mode == "model":
            batches[mode] = forward.reference_columns(batch)  # type: ignore[attr-defined]
        else:
            batches[mode] = {k: batch[k] for k in ("ref_chosen_logps", "ref_rejected_logps")}
        out = forward(run.model, batch)
        assert out.ref_chosen_logps is not None and out.ref_rejected_logps is not None
    for key, value in batches["model"].items():
        assert torch.equal(batches["cache"][key], value.float()), key


def test_a_reference_free_loss_loads_no_reference_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import losslab.train.reference

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a reference model was loaded")

    monkeypatch.setattr(losslab.train.reference, "frozen_reference", refuse)
    out = tmp_path / "simpo"
    metrics = train(config(out, loss=[{"name": "preference", "loss_type": "simpo", "beta": 2.0}], validation=True))
    assert json.loads((out / "summary.json").read_text())["reference"] == "none"
    assert "validation/reward_accuracy" in metrics
    assert all("rewards/chosen" in r for r in rows(out) if "loss/preference" in r)


def test_kto_unpairs_paired_records_and_logs_its_kl_baseline(tmp_path: Path) -> None:
    out = tmp_path / "kto"
    metrics = train(config(out, loss=[{"name": "kto", "beta": 0.1}], validation=True))
    summary = json.loads((out / "summary.json").read_text())
    assert "paired records unpaired" in summary["items"]
    steps = [r for r in rows(out) if "loss/kto" in r]
    assert steps[0]["loss/kto"] == pytest.approx(0.5, abs=1e-6)  # sigmoid(0) at init: reward = kl = 0
    assert all(r["kl"] >= 0 for r in steps)
    assert 0 <= metrics["validation/reward_accuracy"] <= 1


def test_a_reference_loss_without_a_reference_is_a_config_error_before_any_model() -> None:
    cfg = config(None, output_dir="unused", preference={"reference": "none"})
    with pytest.raises(UserError, match="needs ref_chosen_logps and ref_rejected_logps"):
        plan_loss(cfg)
    kto = config(None, output_dir="unused", preference={"reference": "none"}, loss=[{"name": "kto"}])
    with pytest.raises(UserError, match="kl_baseline and ref_logps"):
        plan_loss(kto)
    simpo = config(None, output_dir="unused", loss=[{"name": "preference", "loss_type": "simpo"}])
    assert not plan_loss(simpo).needs.provides & REFERENCE_FIELDS


def test_shared_and_concat_layouts_give_the_same_step(tmp_path: Path) -> None:
    first = {}
    for layout in ("shared", "concat"):
        out = tmp_path / layout
        terms = [{"name": "preference", "loss_type": "ipo"}, {"name": "token_cross_entropy", "weight": 0.1}]
        train(config(out, loss=terms, training={"max_steps": 1}, preference={"layout": layout}))
        first[layout] = rows(out)[0]
    for key in ("loss/preference", "loss/token_cross_entropy", "grad_norm", "logps/chosen", "logps/rejected"):
        assert first["concat"][key] == pytest.approx(first["shared"][key], rel=1e-4), key


def test_unpaired_records_train_kto_by_default(tmp_path: Path) -> None:
    data = tmp_path / "kto.jsonl"
    records = [
        {"prompt": "Say something nice.", "completion": "What a lovely day!", "desirable": True},
        {"prompt": "Say something nice.", "completion": "Go away.", "desirable": False},
        {"prompt": [{"role": "user", "content": "Greet me."}], "completion": "Hello, friend!", "desirable": True},
        {"prompt": "Greet me.", "completion": "No.", "desirable": False},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    metrics = train(config(out, data={"train": str(data), "validation": str(data)}, eval={"splits": ["validation"]}))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == "unpaired (kto)" and summary["loss"].startswith("kto (the preference default")
    assert {"loss/kto", "kl", "rewards/chosen"} <= set(rows(out)[0])
    assert set(metrics) >= {f"validation/{m}" for m in METRICS}


def test_kto_on_pairs_samples_replies_for_each_pair_beside_its_chosen_reply(tmp_path: Path) -> None:
    """Unpaired from pairs, every pair is held out twice (its chosen and its rejected item):
    replies are sampled once per pair, beside the reply a human preferred, never the rejected one."""
    out = tmp_path / "kto"
    eval_ = {"splits": ["validation"], "generate": True, "generation_samples": 8, "max_new_tokens": 2}
    train(config(out, loss=[{"name": "kto"}], validation=True, eval=eval_, training={"max_steps": 1}))
    predictions = [json.loads(line) for line in (out / "predictions_validation.jsonl").read_text().splitlines()]
    generations = [json.loads(line) for line in (out / "generations_validation.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and len(generations) == 4
    assert [g["reference"] for g in generations] == [p["completion"] for p in predictions if p["desirable"]]
