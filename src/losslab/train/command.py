"""``losslab train CONFIG.yaml [--set key=value ...]``: read and check the config (file, line
and field in every error), then :func:`losslab.train.run.train`."""

from __future__ import annotations

import argparse
from pathlib import Path

from losslab.config import read_config
from losslab.data.builtin import BUILTIN_DATA_PREFIX, SPLITS
from losslab.errors import UserError
from losslab.eval.report import format_metrics_table
from losslab.train import run
from losslab.train.config import TrainConfig
from losslab.train.lora import check_lora
from losslab.train.task import plan_loss


def run_train(args: argparse.Namespace) -> int:
    file = read_config(args.config, args.overrides)
    config = file.validate(TrainConfig)
    for split in SPLITS:  # (a task's loss needs may read the first training record)
        spec = getattr(config.data, split)
        if spec and not spec.startswith(BUILTIN_DATA_PREFIX) and not Path(spec).expanduser().is_file():
            raise UserError(f"data file not found: {spec}", where=file.where("data", split))
    plan = plan_loss(
        config,
        where=file.where("loss", "terms"),  # fail before any work
        term_where=lambda i: file.where("loss", "terms", str(i)),
    )
    lora_key = ("model", "lora") if isinstance(file.data.get("model"), dict) else ("lora",)
    check_lora(config, where=file.where(*lora_key, "target_modules"))  # before any data or weight is read
    metrics = run.train(config, plan=plan)
    print(format_metrics_table(metrics))
    print(f"outputs: {config.output_dir} (metrics.json, summary.json, log.jsonl, model/)")
    return 0
