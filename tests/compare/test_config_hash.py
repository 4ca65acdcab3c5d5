"""Run folders are keyed by config_hash: fields added to the training config later must not
change the hash of configs that leave them at their default (else upgrading reruns finished
studies), and must change it when set."""

from __future__ import annotations

from losslab.compare.config import ADDED_FIELDS, config_hash

BASE = {"model": "builtin:tiny-llama", "data": {"train": "builtin:chitchat"}}


def test_the_hash_of_a_config_is_the_one_before_the_added_fields() -> None:
    # computed with losslab at e807e98, before `lora` and `training.gradient_checkpointing` existed
    assert config_hash(BASE) == "67ae1f11c4"


def test_an_added_field_at_its_default_leaves_the_hash_and_set_changes_it() -> None:
    assert config_hash({**BASE, "training": {"gradient_checkpointing": False}}) == config_hash(BASE)
    assert config_hash({**BASE, "training": {"gradient_checkpointing": True}}) != config_hash(BASE)
    assert config_hash({**BASE, "lora": {"r": 8}}) != config_hash(BASE)
    assert {path[0] for path, _ in ADDED_FIELDS} >= {"lora", "training"}
