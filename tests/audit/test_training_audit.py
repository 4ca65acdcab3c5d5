"""``losslab audit CONFIG.yaml`` (normalisation and loss scale) on the tiny Llama: losslab's losses
pass at 1e-5; a per-micro-batch mean and a per-row mean (user ``compute_loss_func``s) are flagged
with their measured differences; each finding kind disappears when its check is removed."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from losslab.audit.normalisation import TOLERANCE, LossUnderTest, check_normalisation
from losslab.audit.scale import check_scale, check_spread
from losslab.audit.setup import AuditSetup, build_setup, load_loss_func, prepared_config
from losslab.audit.training import KINDS
from losslab.errors import UserError
from losslab.integrations import loss_func
from losslab.train.config import TrainConfig
from losslab.train.task import plan_loss

from ..conftest import train_config

B = 4


def per_micro_batch_mean(outputs, labels, num_items_in_batch=None):
    """The bug: the mean over this micro-batch's tokens, whatever the step's count."""
    logits = outputs.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def per_row_mean(outputs, labels, num_items_in_batch=None):
    """Each row's mean token loss, summed over rows, over the step's count of rows (B): right under
    accumulation only while each row is one sample; packing makes one row of four."""
    logits, target = outputs.logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (R, T)
    trained = target.ne(-100)
    rows = (tokens * trained).sum(1) / trained.sum(1).clamp(min=1)
    return rows.sum() / B


def summed_over_num_items(outputs, labels, num_items_in_batch=None):
    """Right: the sum over tokens over the step's global count."""
    logits = outputs.logits[:, :-1]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
    return total / num_items_in_batch


def config(terms: list[dict]) -> TrainConfig:
    data = train_config(".", loss={"terms": terms}, training={"batch_size": B})
    return prepared_config(TrainConfig.model_validate(data), B)


@pytest.fixture(scope="module")
def setup() -> AuditSetup:
    return build_setup(
        config([{"name": "token_cross_entropy", "label_smoothing": 0.1}, {"name": "l2", "weight": 1e-3}]), B
    )


def with_terms(setup: AuditSetup, terms: list[dict]) -> AuditSetup:
    cfg = config(terms)
    return dataclasses.replace(setup, config=cfg, plan=plan_loss(cfg))


def test_normalisation(setup: AuditSetup) -> None:
    losses = [
        LossUnderTest("losslab"),
        LossUnderTest("micro", func=per_micro_batch_mean),
        LossUnderTest("rows", func=per_row_mean),
        LossUnderTest("sum", func=summed_over_num_items),
        # losslab's composite (with its per-batch l2 term) in a plain transformers.Trainer
        LossUnderTest("integration", func=loss_func(setup.plan.terms, model=setup.run.model)),
    ]
    rows, findings = check_normalisation(setup, losses, two_processes=None, where="c.yaml")
    table = {(r["loss"], r["check"]): r for r in rows}
    for name in ("losslab", "sum", "integration"):  # exact normalisation: pass at 1e-5 (measured: ~1e-16 gradients)
        for check in ("accumulation", "packing"):
            r = table[(name, check)]
            assert r["verdict"] == "pass"
            assert r["loss_rel"] <= TOLERANCE and r["grad_max_rel"] <= TOLERANCE and r["grad_rel"] < 1e-12
    # the per-micro-batch mean: 2 micro-batches of means summed by the Trainer ~ twice the loss
    micro = table[("micro", "accumulation")]
    assert micro["verdict"] == "FAIL" and micro["loss_other"] / micro["loss_ref"] == pytest.approx(2.0, rel=0.05)
    assert table[("micro", "packing")]["verdict"] == "pass"  # one row of the same tokens: the same mean
    rows_packed = table[("rows", "packing")]
    assert rows_packed["verdict"] == "FAIL" and rows_packed["loss_other"] < rows_packed["loss_ref"] / 2
    kinds = {(f.kind, f.details.get("loss")) for f in findings}
    assert ("accumulation_mismatch", "micro") in kinds
    assert ("packing_mismatch", "rows") in kinds
    assert not any(f.details.get("loss") in ("losslab", "sum", "integration") for f in findings if f.level == "error")
    assert {f.kind for f in findings} <= set(KINDS)
    flagged = next(f for f in findings if f.kind == "accumulation_mismatch" and f.details["loss"] == "micro")
    assert f"{micro['loss_rel']:.3g}" in flagged.message and flagged.where == "c.yaml"
    skipped = [f for f in findings if f.kind == "check_skipped"]
    assert len(skipped) == len(losses) and all("processes" in f.message for f in skipped)


def test_a_failed_two_process_check_and_a_raising_user_loss(setup: AuditSetup) -> None:
    def torchrun_fails(spec: str | None, collator: str) -> None:
        raise RuntimeError("torchrun exited with 1: gloo could not bind")

    rows, findings = check_normalisation(
        setup, [LossUnderTest("losslab")], two_processes=torchrun_fails, where="c.yaml"
    )
    failed = [f for f in findings if f.kind == "check_failed"]
    assert len(failed) == 1 and failed[0].level == KINDS["check_failed"][0] == "warning"
    assert "gloo could not bind" in failed[0].message
    assert {r["check"]: r["verdict"] for r in rows}["processes"] == "skipped"

    def broken(outputs, labels, num_items_in_batch=None):
        raise KeyError("logits")

    with pytest.raises(UserError, match=r"--loss-func: my_loss.py:broken raised KeyError"):
        check_normalisation(setup, [LossUnderTest("mine", spec="my_loss.py:broken", func=broken)], where="c.yaml")


def test_scale_shares_and_low_share(setup: AuditSetup) -> None:
    rows, findings, summary = check_scale(setup, where="c.yaml")
    by_term = {r["term"]: r for r in rows}
    assert sum(r["norm_share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["projection"] for r in rows) == pytest.approx(1.0)
    # the cross-entropy term's gradient, by hand: plain label-smoothed CE on the first batch
    model = setup.run.model
    batch = setup.padded(setup.run.train[:B])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ce = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], label_smoothing=0.1)
    grads = torch.autograd.grad(ce, list(model.parameters()))
    assert by_term["token_cross_entropy"]["value"] == pytest.approx(float(ce.detach()), rel=1e-10)
    assert by_term["token_cross_entropy"]["grad_norm"] == pytest.approx(
        float(torch.sqrt(sum(g.pow(2).sum() for g in grads))), rel=1e-10
    )
    assert summary["loss"] == pytest.approx(sum(r["weighted"] for r in rows))
    # l2 at 1e-3 is well above 1 % here; at 1e-7 it is not
    assert not [f for f in findings if f.kind == "term_gradient_share_low"]
    tiny = with_terms(setup, [{"name": "token_cross_entropy"}, {"name": "l2", "weight": 1e-7}])
    rows, findings, _ = check_scale(tiny)
    low = [f for f in findings if f.kind == "term_gradient_share_low"]
    assert [f.details["term"] for f in low] == ["l2"] and low[0].details["norm_share"] < 0.01


def test_scale_weight_zero_at_start(setup: AuditSetup) -> None:
    ramp = {"schedule": "linear", "start": 0.0, "end": 1.0, "total_steps": 10}
    rows, findings, _ = check_scale(
        with_terms(setup, [{"name": "token_cross_entropy"}, {"name": "l2", "weight": ramp}])
    )
    assert [f.kind for f in findings] == ["term_weight_zero_at_start"]
    assert {r["term"]: r["norm_share"] for r in rows} == {"token_cross_entropy": 1.0, "l2": 0.0}


def test_spread_between_variants() -> None:
    rows, findings = check_spread({"a": {"loss": 2.0, "grad_norm": 1.0}, "b": {"loss": 21.0, "grad_norm": 9.0}})
    assert [f.details["quantity"] for f in findings] == ["loss"]
    assert findings[0].details["ratio"] == pytest.approx(10.5) and len(rows) == 2
    assert check_spread({"a": {"loss": 2.0, "grad_norm": 1.0}, "b": {"loss": 19.0, "grad_norm": 9.0}})[1] == []


def test_loss_func_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.py").write_text("def loss(outputs, labels, num_items_in_batch=None):\n    return 0\n")
    assert load_loss_func(f"{tmp_path / 'mine.py'}:loss").__name__ == "loss"
    monkeypatch.chdir(tmp_path)
    assert load_loss_func("mine:loss").__name__ == "loss"
    for bad in ("mine", "mine:nope", "nowhere.py:loss", "no_such_module_xyz:loss"):
        with pytest.raises(UserError, match="--loss-func"):
            load_loss_func(bad)


@pytest.mark.slow
def test_study_and_two_processes(tmp_path: Path) -> None:
    """A study of two variants whose losses differ ~100x, with the two-process check (torchrun) and
    a per-micro-batch mean (flagged under 2 processes: the Trainer multiplies each process's loss
    by 2)."""
    from losslab.audit.processes import torchrun
    from losslab.audit.training import audit_config

    if torchrun() is None:
        pytest.skip("torchrun not installed")
    (tmp_path / "mine.py").write_text(
        "import torch.nn.functional as F\n"
        "def loss(outputs, labels, num_items_in_batch=None):\n"
        "    logits = outputs.logits[:, :-1]\n"
        "    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))\n"
    )
    base = train_config(None, training={"batch_size": B})
    study = {
        "base": base,
        "variants": [
            {"name": "ce", "overrides": {}},
            {"name": "ce_x100", "overrides": {"loss.terms": [{"name": "token_cross_entropy", "weight": 100.0}]}},
        ],
        "seeds": [0],
        "metrics": [{"name": "train/steps"}],
        "output_dir": str(tmp_path / "study"),
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    args = argparse.Namespace(loss_func=f"{tmp_path / 'mine.py'}:loss", processes="auto")
    report = audit_config(str(tmp_path / "study.yaml"), args)
    rows = report.tables["normalisation"]
    assert {r["variant"] for r in rows} == {"ce", "ce_x100"}
    losslab_rows = [r for r in rows if r["loss"].startswith("losslab")]
    assert len(losslab_rows) == 6 and all(r["verdict"] == "pass" for r in losslab_rows)
    kinds = [f.kind for f in report.findings if f.level != "info"]
    assert kinds.count("processes_mismatch") == 2 and kinds.count("accumulation_mismatch") == 2
    assert "loss_scale_spread" in kinds and len(report.tables["variants"]) == 2


def test_kinds_documented() -> None:
    """Every finding kind of the config audit is described in docs/audit-training.md."""
    docs = (Path(__file__).parents[2] / "docs" / "audit-training.md").read_text(encoding="utf-8")
    assert [k for k in KINDS if f"`{k}`" not in docs] == []


def test_bad_input_before_any_model(tmp_path: Path, no_model) -> None:
    """A bad term names the config's file, line and field; a bad --loss-func names the option;
    both before a model is loaded (``no_model``)."""
    from losslab.audit.training import audit_config

    good = train_config(".")
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good, sort_keys=False))
    bad = {**good, "loss": {"terms": [{"name": "token_cross_entropyy"}]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(UserError, match=r"bad\.yaml:\d+: field 'loss\.terms\.0'.*unknown loss"):
        audit_config(tmp_path / "bad.yaml", argparse.Namespace())
    with pytest.raises(UserError, match="--loss-func.*no_such_module_xyz"):
        audit_config(tmp_path / "good.yaml", argparse.Namespace(loss_func="no_such_module_xyz:loss"))
