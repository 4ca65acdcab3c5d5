"""Training settings that only make sense together are checked before any work, and the
settings handed to the Trainer are the ones the config asks for."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from losslab.errors import UserError
from losslab.train.config import TrainConfig
from losslab.train.run import check_best_model_metric, train, training_arguments

BASE = {
    "task": "causal_lm",
    "model": "builtin:tiny-llama",
    "output_dir": ".",
    "data": {"train": "builtin:chatterbot", "validation": "builtin:chatterbot"},
}


def config(**sections) -> TrainConfig:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return TrainConfig.model_validate(data)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"data": {"packing": True}, "loss": {"terms": [{"name": "token_cross_entropy", "reduction": "sequence"}]}},
            r"loss.terms.0 \(token_cross_entropy, reduction sequence\) works on whole samples",
        ),
        (
            {
                "data": {"packing": True},
                "loss": {"terms": [{"name": "token_cross_entropy"}, {"name": "semantic_alignment"}]},
            },
            r"loss.terms.1 \(semantic_alignment\) works on whole samples",
        ),
        ({"training": {"metric_for_best_model": "accuracy"}}, "'accuracy' is not measured during training"),
        ({"data": {"validation": None}, "training": {"early_stopping_patience": 2}}, "needs validation data"),
        ({"training": {"early_stopping_patience": 2, "save_steps": 4}}, "needs training.eval_steps"),
        (
            {"training": {"early_stopping_patience": 2, "save_steps": 5, "eval_steps": 2}},
            r"save_steps \(5\) must be a multiple of training.eval_steps \(2\)",
        ),
    ],
)
def test_settings_that_do_not_go_together_are_refused(sections: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config(**sections)


def test_settings_that_go_together_are_accepted() -> None:
    config(data={"packing": True}, loss={"terms": [{"name": "token_cross_entropy"}, {"name": "consistency"}]})
    config(
        training={
            "early_stopping_patience": 2,
            "save_steps": 4,
            "eval_steps": 2,
            "metric_for_best_model": "eval_loss/token_cross_entropy",
        }
    )
    config(training={"metric_for_best_model": "loss"})


def test_a_constant_schedule_with_warmup_warms_up() -> None:
    """The Trainer's `constant` schedule ignores warmup steps; losslab asks for constant_with_warmup."""
    assert (
        training_arguments(config(training={"scheduler": "constant", "warmup": 3}), has_eval=False).lr_scheduler_type
        == "constant_with_warmup"
    )
    assert (
        training_arguments(config(training={"scheduler": "constant"}), has_eval=False).lr_scheduler_type == "constant"
    )
    assert (
        training_arguments(config(training={"scheduler": "cosine", "warmup": 3}), has_eval=False).lr_scheduler_type
        == "cosine"
    )


def test_best_model_metric_must_name_a_term_of_the_run() -> None:
    from losslab.losses.registry import build_composite

    composite = build_composite([{"name": "token_cross_entropy"}, {"name": "l2", "weight": 1e-3, "label": "decay"}])
    for metric in ("eval_loss", "eval_loss/token_cross_entropy", "loss/decay"):
        check_best_model_metric(config(training={"metric_for_best_model": metric}), composite)
    with pytest.raises(UserError, match="eval_loss/token_cross_entropy, eval_loss/decay"):
        check_best_model_metric(config(training={"metric_for_best_model": "eval_loss/l2"}), composite)


def test_a_causal_lm_term_it_cannot_feed_fails_before_data_and_model_load(monkeypatch, tmp_path: Path) -> None:
    from losslab.train.tasks import causal_lm

    def boom(*args, **kwargs):
        raise AssertionError("loaded before the loss terms were checked")

    monkeypatch.setattr(causal_lm, "load_tokenizer", boom)
    monkeypatch.setattr(causal_lm, "load_causal_lm", boom)
    with pytest.raises(UserError, match="bradley_terry.*a causal_lm batch provides"):
        train(config(loss={"terms": [{"name": "bradley_terry"}]}))


@pytest.mark.parametrize(
    ("task", "term"),
    [
        ("causal_lm", "bradley_terry"),
        ("sequence_classification", "bradley_terry"),
        ("token_classification", "info_nce"),
        ("reward_model", "consistency"),
        ("embedding", "bradley_terry"),
    ],
)
def test_every_task_refuses_a_term_it_cannot_feed_without_loading_anything(task: str, term: str, monkeypatch) -> None:
    """``plan_loss``, which ``losslab compare`` runs for every variant before the first run."""
    import importlib

    from losslab.train.task import plan_loss

    module = importlib.import_module(f"losslab.train.tasks.{task}")
    for name in ("load_tokenizer", "load_model", "load_causal_lm"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("loaded something"))
    cfg = config(data={"label_type": "class"}, loss={"terms": [{"name": term}]})
    with pytest.raises(UserError, match=rf"loss.terms: .*{term}.*a {task}.* batch provides"):
        plan_loss(cfg.model_copy(update={"task": task}))


def test_a_schedule_without_total_steps_is_checked_then_takes_the_runs_length() -> None:
    """A weight schedule that leaves ``total_steps`` to the trainer passes the up-front check
    whatever its warmup (before, the check completed it with 1 step, so any warmup failed), and
    the run's composite gets the run's length."""
    from losslab.train.task import plan_loss

    schedule = {"schedule": "cosine", "start": 1.0, "end": 0.0, "warmup_steps": 10}
    plan = plan_loss(config(loss={"terms": [{"name": "token_cross_entropy", "weight": schedule}]}))
    assert plan.build(total_steps=40).terms[0].weight.total_steps == 40
    with pytest.raises(UserError, match="total_steps must be an integer >= 11"):
        plan.build(total_steps=10)  # a run shorter than the warmup
