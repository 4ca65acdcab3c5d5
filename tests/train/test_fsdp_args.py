"""training.fsdp / fsdp_config reach the Trainer's FSDP plugin arguments unchanged."""

from __future__ import annotations

from losslab.train.config import TrainConfig
from losslab.train.run import training_arguments


def config(**training) -> TrainConfig:
    return TrainConfig.model_validate({"output_dir": "out", "data": {"train": "t.jsonl"}, "training": training})


def test_fsdp_is_off_by_default() -> None:
    args = training_arguments(config(), has_eval=False)
    assert not args.fsdp and args.fsdp_plugin_args is None


def test_fsdp_config_becomes_the_plugin_arguments() -> None:
    args = training_arguments(
        config(
            fsdp=True,
            fsdp_config={
                "version": 2,
                "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                "state_dict_type": "FULL_STATE_DICT",
            },
        ),
        has_eval=False,
    )
    assert args.fsdp is True
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"
