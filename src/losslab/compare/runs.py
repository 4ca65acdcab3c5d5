"""The runs of a study (:class:`Run`: one variant x seed): planning them, training them resumably
on the study's executor (:mod:`losslab.compare.execution`), and reading what each wrote
(``log.jsonl``, generations).

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
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from losslab.compare.config import Study, config_hash
from losslab.compare.execution import Execution, Job, run_jobs, threads_per_run
from losslab.errors import UserError
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


@dataclass(frozen=True)
class RunJob:
    """Training one run as a :class:`~losslab.compare.execution.Job` (picklable, idempotent): a
    finished run (``metrics.json``) is left alone, an unfinished one resumes from its last
    checkpoint. ``threads``: torch threads while it trains (the same in every executor).
    ``study_dir``: the study's output_dir, which the driver has created: a worker that does not
    see it is on storage the driver does not share."""

    config: dict[str, Any]
    study_dir: str
    threads: int | None = None
    keep_checkpoints: bool = False

    def __call__(self) -> None:
        from losslab.compare.execution import torch_threads

        run_dir = Path(self.config["output_dir"])
        if (run_dir / "metrics.json").is_file():
            return
        if not Path(self.study_dir).is_dir():
            raise UserError(
                f"output_dir {self.study_dir!r} is not visible on {socket.gethostname()}: put the study's "
                "output_dir on storage every worker sees, at the same absolute path (docs/scaling.md)"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        with torch_threads(self.threads):
            train_run(self.config)
        if not self.keep_checkpoints:
            drop_checkpoints(run_dir)


def execute(
    runs: list[Run],
    keep_checkpoints: bool = False,
    execution: Execution | None = None,
    shard: tuple[int, int] | None = None,
) -> list[Run]:
    """Train the unfinished runs on ``execution`` (default: sequential); every run comes back with
    its metrics. Finished runs lose their checkpoints unless ``keep_checkpoints``.

    ``shard`` ``(k, n)``: train only the runs at positions k-1, k-1+n, ... of the plan (a stable
    split: n jobs of an array each take their own runs, however far the others are), and return
    without loading metrics (the runs of other shards may still be training)."""
    execution = execution or Execution()
    if not runs:
        return []
    mine = runs if shard is None else [r for i, r in enumerate(runs) if i % shard[1] == shard[0] - 1]
    todo = [r for r in mine if not r.done]
    what = "" if shard is None else f" (shard {shard[0]}/{shard[1]}: {len(mine)} of them)"
    print(
        f"losslab compare: {len(runs)} runs{what}, {len(mine) - len(todo)} already finished, {len(todo)} to run"
        + ("" if execution.backend == "sequential" else f" on {describe(execution)}"),
        flush=True,
    )
    threads = threads_per_run(execution)
    # ray: absolute paths, so that a worker whose working directory differs writes the same folders
    absolute = execution.backend == "ray"
    study_dir = str(Path(runs[0].dir).parent.parent.resolve() if absolute else Path(runs[0].dir).parent.parent)
    Path(study_dir).mkdir(parents=True, exist_ok=True)  # (a worker that does not see it stops: RunJob)
    jobs = [
        Job(
            f"{r.variant} seed {r.seed} -> {r.dir}",
            RunJob(
                {**r.config, "output_dir": str(r.dir.resolve() if absolute else r.dir)},
                study_dir,
                threads,
                keep_checkpoints,
            ),
        )
        for r in todo
    ]
    run_jobs(jobs, execution)
    if not keep_checkpoints:  # also those left by a run killed after its metrics.json
        for run in mine:
            if run.done:
                drop_checkpoints(run.dir)
    return mine if shard is not None else [r.load() for r in runs]


def describe(execution: Execution) -> str:
    """``2 worker processes, 1 thread each`` and the like, for the first progress line."""
    threads = threads_per_run(execution)
    if execution.backend == "processes":
        n = execution.workers or 1
        gpus = f", GPU share {execution.resources_per_run.gpus:g}" if execution.resources_per_run.gpus else ""
        return f"{n} worker process{'es' if n > 1 else ''}, {threads} thread{'s' if threads > 1 else ''} each{gpus}"
    at_once = f"at most {execution.workers} at once" if execution.workers else "as many at once as fit"
    return f"Ray ({at_once}, {threads} thread{'s' if threads > 1 else ''} per run)"


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
