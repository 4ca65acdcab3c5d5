"""The runs of a study (:class:`Run`: one variant x seed): planning them, training them one after
the other and resumably, and reading what each wrote (``log.jsonl``, generations).

Each run lives in ``OUTPUT_DIR/runs/<variant>__seed<k>__<hash>/`` where ``hash`` is a hash of
its resolved training config: a run whose ``metrics.json`` exists is finished and is not run
again; an unfinished one resumes from its last checkpoint (``losslab train`` does that). A
changed variant gets a new hash, hence a new folder, so stale results are never reused.
Once a run is finished its ``checkpoint-*`` folders (model, optimizer state: several times the
model's size each) are deleted unless ``keep_checkpoints: true``; ``model/`` stays.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from losslab.compare.config import Study, config_hash
from losslab.eval.report import read_metrics_json


@dataclass
class Run:
    """One variant x seed: where it lives, its resolved config, and (once done) its metrics."""

    variant: str
    seed: int
    config: dict[str, Any]
    dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return (self.dir / "metrics.json").is_file()

    def load(self) -> Run:
        self.metrics = read_metrics_json(self.dir / "metrics.json")
        return self


def plan(study: Study, tuned: dict[str, dict[str, Any]] | None = None) -> list[Run]:
    """Every variant x seed run, in config order (``tuned``: variant -> best tuned values)."""
    runs = []
    for variant in study.config.variants:
        for seed in study.config.seeds:
            data = study.resolve(variant, seed, (tuned or {}).get(variant.name))
            folder = study.out / "runs" / f"{variant.name}__seed{seed}__{config_hash(data)}"
            runs.append(Run(variant.name, seed, {**data, "output_dir": str(folder)}, folder))
    return runs


def train_run(config: dict[str, Any], on_evaluate: Any = None) -> dict[str, float]:
    """Train one resolved config (a seam for tests); ``on_evaluate``: see :mod:`losslab.train.hooks`."""
    from losslab.train.config import TrainConfig
    from losslab.train.run import train

    return train(TrainConfig.model_validate(config), on_evaluate=on_evaluate)


def drop_checkpoints(run_dir: Path) -> None:
    """Delete the ``checkpoint-*`` folders of a run that needs no resume any more. Each is first
    renamed (atomic), so a kill mid-way never leaves a half-deleted folder named like a checkpoint;
    what such a kill leaves is deleted by the next call."""
    for path in sorted(run_dir.glob("checkpoint-*")):
        if path.is_dir():
            path.rename(run_dir / f".deleting-{path.name}")
    for path in sorted(run_dir.glob(".deleting-checkpoint-*")):
        shutil.rmtree(path)


def execute(runs: list[Run], keep_checkpoints: bool = False) -> list[Run]:
    """Train the unfinished runs one after the other; every run comes back with its metrics.
    Finished runs lose their checkpoints unless ``keep_checkpoints``."""
    todo = [r for r in runs if not r.done]
    print(f"losslab compare: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run")
    started = time.monotonic()
    for i, run in enumerate(todo, 1):
        print(
            f"\n[{progress_bar(i - 1, len(todo))}] run {i}/{len(todo)}: {run.variant} seed {run.seed} -> {run.dir}"
            + eta(started, i - 1, len(todo)),
            flush=True,
        )
        run.dir.mkdir(parents=True, exist_ok=True)
        train_run(run.config)
        if not keep_checkpoints:
            drop_checkpoints(run.dir)
    if todo:
        print(
            f"[{progress_bar(len(todo), len(todo))}] {len(todo)} runs in {time.monotonic() - started:.0f} s", flush=True
        )
    if not keep_checkpoints:  # also those left by a run killed after its metrics.json
        for run in runs:
            drop_checkpoints(run.dir)
    return [r.load() for r in runs]


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else width
    return "#" * filled + "." * (width - filled)


def eta(started: float, done: int, total: int) -> str:
    if done == 0:
        return ""
    left = (time.monotonic() - started) / done * (total - done)
    return f" (about {left / 60:.1f} min left)"


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``log.jsonl`` (empty when absent)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_generations(run_dir: Path, split: str = "test") -> list[dict[str, str]]:
    """A run's saved generations (``prompt``, ``reference``, ``hypothesis``), empty when absent."""
    path = run_dir / f"generations_{split}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
