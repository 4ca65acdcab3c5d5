"""End to end through ``losslab.train.run.train`` for sequence_classification,
token_classification, reward_model and embedding: on the tiny Llama, a fixed batch (as many
samples as the batch size) for a few steps, the trained term goes down, every term of the
composite is logged each step, and metrics.json has the task's metrics. Then each task's
example config parses and runs with tiny step counts given as ``--set`` overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from losslab.config import load_config
from losslab.eval.report import read_metrics_json
from losslab.train.config import TrainConfig
from losslab.train.run import train

from ..conftest import train_config

STEPS = 6
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: one thread is much faster than two on a shared machine (no spin contention)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(
    tmp_path: Path,
    task: str,
    dataset: str,
    terms: list[dict] | None = None,
    *,
    validation: bool = False,
    **sections: dict,
) -> tuple[dict, list[dict]]:
    """Train ``task`` for STEPS steps on one fixed batch of 8; returns metrics.json and the
    per-step training rows of log.jsonl."""
    config = train_config(
        tmp_path / "run",
        task=task,
        validation=validation,
        data={
            "train": dataset,
            "test": dataset,
            "max_train_samples": 8,
            "max_eval_samples": 8,
            "max_length": 32,
            **sections.pop("data", {}),
        },
        loss=None if terms is None else {"terms": terms},
        training={"max_steps": STEPS, "batch_size": 8, "scheduler": "constant", "save_steps": 100},
        eval=sections.pop("eval", None),
        **sections,
    )
    train(TrainConfig(**config))
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    metrics = read_metrics_json(tmp_path / "run" / "metrics.json")
    return metrics, rows


def assert_predictions_give_the_metrics(
    tmp_path: Path, metrics: dict, names: tuple[str, ...], n: int = 8
) -> list[dict]:
    """predictions_test.jsonl has one record per test example, and the metrics recomputed from
    it (the statistics ``losslab compare`` bootstraps) are the ones in metrics.json."""
    from losslab.compare.examples import class_names, example_stats, read_predictions

    rows = read_predictions(tmp_path / "run", "test")
    assert len(rows) == n
    classes = class_names(metrics, "test", rows) if isinstance(rows[0].get("gold"), str) else []
    for name in names:
        stats, score = example_stats(name, rows, classes)
        assert stats.shape[0] == n
        assert score(stats.sum(axis=0)) == pytest.approx(metrics[f"test/{name}"], abs=1e-9), name
    return rows


def step_rows(rows: list[dict], term: str) -> list[dict]:
    steps = [r for r in rows if f"loss/{term}" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    return steps


def assert_goes_down(rows: list[dict], term: str) -> None:
    steps = step_rows(rows, term)
    assert steps[-1][f"loss/{term}"] < 0.8 * steps[0][f"loss/{term}"], [r[f"loss/{term}"] for r in steps]


def test_sequence_classification_focal_with_l2_sp(tmp_path: Path) -> None:
    terms = [{"name": "focal", "gamma": 2.0}, {"name": "l2_sp", "weight": 0.01, "reduction": "mean"}]
    metrics, rows = run(tmp_path, "sequence_classification", "builtin:sentiment", terms)
    assert_goes_down(rows, "focal")
    for r in step_rows(rows, "l2_sp"):  # every term logged, and the total is their weighted sum
        assert r["loss"] == pytest.approx(r["loss/focal"] + 0.01 * r["loss/l2_sp"], rel=1e-4)
    assert step_rows(rows, "l2_sp")[0]["loss/l2_sp"] == 0.0  # at the reference point before the first update
    assert step_rows(rows, "l2_sp")[-1]["loss/l2_sp"] > 0.0
    for name in (
        "accuracy",
        "f1_macro",
        "f1_weighted",
        "loss",
        "f1/negative",
        "f1/neutral",
        "f1/positive",
        "support/positive",
    ):
        assert f"test/{name}" in metrics, name
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    assert sum(metrics[f"test/support/{c}"] for c in ("negative", "neutral", "positive")) == 8
    preds = assert_predictions_give_the_metrics(
        tmp_path, metrics, ("accuracy", "f1_macro", "f1_weighted", "f1/neutral")
    )
    assert set(preds[0]) == {"text", "gold", "predicted", "score"} and 1 / 3 <= preds[0]["score"] <= 1
    from losslab.data.builtin import resolve_data_path

    test_texts = [
        json.loads(line)["text"] for line in resolve_data_path("builtin:sentiment", "test").read_text().splitlines()[:8]
    ]
    assert [p["text"] for p in preds] == test_texts


def test_sequence_classification_regression_defaults_to_mse(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics, rows = run(tmp_path, "sequence_classification", "builtin:sentiment_regression")
    assert "loss: mse (the sequence_classification (regression) default" in capsys.readouterr().out
    assert_goes_down(rows, "mse")
    assert {"test/mse", "test/rmse", "test/mae", "test/pearson", "test/spearman"} <= set(metrics)
    assert_predictions_give_the_metrics(tmp_path, metrics, ("mse", "rmse", "mae"))


def test_sequence_classification_multi_label_defaults_to_bce(tmp_path: Path) -> None:
    texts = ["red apple", "green pear", "red and green", "blue sky", "red car", "green grass", "nothing", "blue red"]
    data = tmp_path / "multi.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t, "label": [c for c in ("red", "green", "blue") if c in t]}) + "\n" for t in texts)
    )
    metrics, rows = run(tmp_path, "sequence_classification", str(data))
    assert_goes_down(rows, "binary_cross_entropy")
    assert {"test/subset_accuracy", "test/hamming_loss", "test/f1_micro", "test/f1/red", "test/loss"} <= set(metrics)


def test_token_classification_ner(tmp_path: Path) -> None:
    metrics, rows = run(tmp_path, "token_classification", "builtin:ner")
    assert_goes_down(rows, "token_cross_entropy")
    assert {"test/f1_micro", "test/precision_micro", "test/recall_micro", "test/token_accuracy", "test/loss"} <= set(
        metrics
    )
    preds = assert_predictions_give_the_metrics(
        tmp_path, metrics, ("f1_micro", "precision_micro", "recall_micro", "token_accuracy")
    )
    assert all(len(p["gold"]) == len(p["predicted"]) <= len(p["tokens"]) for p in preds)


def test_token_classification_focal_on_flattened_tokens(tmp_path: Path) -> None:
    _metrics, rows = run(tmp_path, "token_classification", "builtin:ner", [{"name": "focal", "gamma": 1.0}])
    assert_goes_down(rows, "focal")


def test_reward_model_bradley_terry_logs_train_and_eval_terms(tmp_path: Path) -> None:
    metrics, rows = run(tmp_path, "reward_model", "builtin:preference", validation=True, data={"max_length": 64})
    assert_goes_down(rows, "bradley_terry")
    assert any("eval_loss/bradley_terry" in r for r in rows)
    for split in ("validation", "test"):
        assert {f"{split}/pairwise_accuracy", f"{split}/reward_margin", f"{split}/loss"} <= set(metrics)
    preds = assert_predictions_give_the_metrics(tmp_path, metrics, ("pairwise_accuracy", "reward_margin"))
    assert all(p["prompt"] and p["chosen"] and p["rejected"] for p in preds)


def test_embedding_info_nce(tmp_path: Path) -> None:
    metrics, rows = run(tmp_path, "embedding", "builtin:chitchat", validation=True)
    assert_goes_down(rows, "info_nce")
    assert any("eval_loss/info_nce" in r for r in rows)  # the head-less model still gets an eval loss
    assert {"test/recall@1", "test/recall@5", "test/recall@10", "test/mrr", "test/candidates"} <= set(metrics)


def test_embedding_triplet_gets_explicit_negatives(tmp_path: Path) -> None:
    metrics, rows = run(
        tmp_path,
        "embedding",
        "builtin:chitchat",
        [{"name": "triplet", "margin": 0.5}],
        embedding={"context_turns": 2, "pooling": "last", "recall_at": [1, 3]},
    )
    assert_goes_down(rows, "triplet")
    assert {"test/recall@1", "test/recall@3", "test/mrr"} <= set(metrics)


# example -> (task, a metric its metrics.json must have for both evaluated splits)
EXAMPLE_CASES = {
    "train_chat_sft.yaml": ("causal_lm", "bleu"),
    "train_sentiment_classification.yaml": ("sequence_classification", "f1_macro"),
    "train_ner.yaml": ("token_classification", "f1_micro"),
    "train_reward_model.yaml": ("reward_model", "pairwise_accuracy"),
    "train_embedding.yaml": ("embedding", "mrr"),
    "train_preference.yaml": ("preference", "reward_accuracy"),
}
TINY = [
    "training.max_steps=2",
    "training.batch_size=4",
    "data.max_train_samples=8",
    "data.max_eval_samples=8",
    "data.max_length=32",
]
# causal_lm's and preference's examples train the 135M SmolLM2: two steps of 2 samples, 2 samples per evaluated split
# (a quarter of the others' tokens; it still evaluates and generates on both splits)
TINY_CAUSAL_LM = [
    "training.max_steps=2",
    "training.batch_size=2",
    "data.max_train_samples=4",
    "data.max_eval_samples=2",
    "data.max_length=128",
    "eval.generation_samples=2",
    "eval.max_new_tokens=4",
]


# the two SmolLM2 runs write 2 GB each (model and checkpoint with optimiser state): one worker runs both, one
# after the other, so that a test run never holds 4 GB of them at once (`--dist loadgroup` in the Makefile)
SMOLLM2_EXAMPLES = {"train_chat_sft.yaml", "train_preference.yaml"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xdist_group("smollm2_checkpoints")) if n in SMOLLM2_EXAMPLES else n
        for n in sorted(EXAMPLE_CASES)
    ],
)
def test_example_parses_and_runs(name: str, tmp_path: Path) -> None:
    task, metric = EXAMPLE_CASES[name]
    full = load_config(TrainConfig, EXAMPLES / name)
    assert full.task == task
    assert full.data.validation and full.data.test
    tiny = TINY_CAUSAL_LM if task in ("causal_lm", "preference") else TINY
    config = load_config(TrainConfig, EXAMPLES / name, [*tiny, f"output_dir={tmp_path}"])
    metrics = train(config)
    assert metrics["train/steps"] == 2
    assert read_metrics_json(tmp_path / "metrics.json") == pytest.approx(metrics, nan_ok=True)
    assert {f"validation/{metric}", f"test/{metric}"} <= set(metrics)
    assert (tmp_path / "model" / "model.safetensors").is_file()
