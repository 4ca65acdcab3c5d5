"""The `cluster` key of test records reaches the saved generations, where `losslab compare`
treats the examples of one cluster as one unit (tests/compare/test_study_stats.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from losslab.data.schemas import SCHEMAS
from losslab.models import load_causal_lm, load_tokenizer
from losslab.train.config import DataConfig, TrainConfig
from losslab.train.run import train
from losslab.train.tasks.causal_lm import generation_metrics, generation_prompts

from ..conftest import train_config


def test_every_record_format_takes_a_cluster_and_refuses_a_bad_one() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    for cluster in ("conversation-7", 7):
        assert SCHEMAS["chat"].model_validate({**chat, "cluster": cluster}).cluster == cluster  # type: ignore[attr-defined]
    assert SCHEMAS["preference"].model_validate({"prompt": "p", "chosen": "a", "rejected": "b", "cluster": 1})
    for bad in ("", 1.5, True, ["a"]):
        with pytest.raises(ValidationError, match="cluster"):
            SCHEMAS["chat"].model_validate({**chat, "cluster": bad})


def test_generation_rows_carry_the_records_cluster(tmp_path: Path) -> None:
    turns = [
        {"messages": [{"role": "user", "content": f"turn {i}"}, {"role": "assistant", "content": "ok"}], "cluster": c}
        for i, c in enumerate(["a", "a", 3])
    ]
    turns.append({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in turns))
    tokenizer = load_tokenizer("builtin:tiny-llama")
    prompts = generation_prompts(path, tokenizer, DataConfig(train=str(path)), limit=10)
    assert [p.cluster for p in prompts] == ["a", "a", 3, None]
    out = tmp_path / "generations_test.jsonl"
    generation_metrics(load_causal_lm("builtin:tiny-llama"), tokenizer, prompts, 2, save_to=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("cluster") for r in rows] == ["a", "a", 3, None] and "cluster" not in rows[3]


def test_preference_generation_and_prediction_rows_carry_the_records_cluster(tmp_path: Path) -> None:
    clusters = ["a", "a", 3, None]
    records = [{"prompt": f"Say thing {i}.", "chosen": "Lovely!", "rejected": "No."} for i in range(4)]
    path = tmp_path / "prefs.jsonl"
    path.write_text(
        "".join(json.dumps({**r, "cluster": c} if c is not None else r) + "\n" for r, c in zip(records, clusters))
    )
    out = tmp_path / "run"
    data = {"train": str(path), "validation": str(path), "max_length": 48, "max_train_samples": None}
    eval_ = {"splits": ["validation"], "generate": True, "generation_samples": 4, "max_new_tokens": 2}
    loss = {"terms": [{"name": "preference", "loss_type": "simpo"}]}  # reference-free: no reference to cache
    train(
        TrainConfig.model_validate(
            train_config(out, task="preference", data=data, eval=eval_, loss=loss, training={"max_steps": 1})
        )
    )
    for name in ("generations_validation.jsonl", "predictions_validation.jsonl"):
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert [r.get("cluster") for r in rows] == clusters and "cluster" not in rows[3], name
