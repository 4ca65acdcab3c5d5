"""Each task's ``metric_names(config)`` (what ``losslab compare`` checks a study's metrics
against before the first run) equals the names a real evaluation gives: on the tiny Llama, the
task built from a few records and evaluated once, untrained (no training needed for the names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from losslab.compare.config import metric_matches
from losslab.train.config import TrainConfig
from losslab.train.task import get_task, plan_loss

CASES = [
    ("causal_lm", "builtin:chitchat", {}),
    ("causal_lm", "builtin:chitchat", {"eval": {"generate": True, "max_new_tokens": 2, "generation_samples": 2}}),
    ("sequence_classification", "builtin:sentiment", {}),
    ("sequence_classification", "builtin:sentiment_regression", {}),
    ("sequence_classification", "multi_label", {}),
    ("token_classification", "builtin:ner", {}),
    ("reward_model", "builtin:preference", {}),
    ("embedding", "builtin:chitchat", {"embedding": {"recall_at": [1, 3]}}),
    ("preference", "builtin:preference", {}),
    ("preference", "builtin:preference", {"eval": {"generate": True, "max_new_tokens": 2, "generation_samples": 2}}),
    ("preference", "builtin:preference", {"loss": {"terms": [{"name": "kto"}]}}),
    (
        "distill",
        "builtin:chitchat",
        {
            "distill": {"teacher": "builtin:tiny-llama"},
            "loss": {"terms": [{"name": "token_cross_entropy"}]},
            "eval": {"generate": True, "max_new_tokens": 2, "generation_samples": 2},
        },
    ),
]


@pytest.mark.parametrize(("task", "data", "sections"), CASES, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(CASES)])
def test_metric_names_are_the_names_evaluate_gives(tmp_path: Path, task: str, data: str, sections: dict) -> None:
    torch.set_num_threads(1)
    if data == "multi_label":
        data = str(tmp_path / "ml.jsonl")
        Path(data).write_text(
            "".join(
                json.dumps({"text": t, "label": labels}) + "\n"
                for t, labels in [("a", ["red"]), ("b", ["blue", "red"]), ("c", []), ("d", ["blue"])]
            )
        )
    config = TrainConfig(
        task=task,
        model="builtin:tiny-llama",
        output_dir=str(tmp_path / "out"),
        data={
            "train": data,
            "validation": data,
            "test": data,
            "max_train_samples": 4,
            "max_eval_samples": 4,
            "max_length": 256,
        },
        **sections,
    )
    names = get_task(task).metric_names(config)
    run = get_task(task).build(config, plan_loss(config))
    produced: set[str] = set()
    for split in config.eval.splits:
        dataset = run.validation if split == "validation" else run.test
        produced |= set(run.evaluate(run.model, dataset, split)) if dataset else set()
    exact = {n for n in names if not n.endswith("/*")}
    assert exact <= produced, sorted(exact - produced)
    assert all(metric_matches(name, names) for name in produced), sorted(
        n for n in produced if not metric_matches(n, names)
    )
    for pattern in names - exact:
        assert any(name.startswith(pattern[:-1]) for name in produced), pattern
