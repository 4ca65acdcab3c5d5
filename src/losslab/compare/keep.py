"""Which final models a finished study keeps (``keep_models: none | best | all``).

Every run (and tuning trial) saves ``model/`` (540 MB for SmolLM2 in float32); a study reads
none of them again. ``best`` keeps the model of the best seed of the winning variant, judged by
the first primary metric and its direction (the variant with the best mean over seeds, then
its best seed; ties go to the first in config order); ``none`` keeps none, ``all`` every one.
Metrics, logs, generations and summaries always stay. Deleting happens once every run is in and
results.json is written, so a rerun of the finished study (runs are done by their metrics.json)
still works; a model deleted once is not brought back by changing the setting.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from losslab.compare.config import Study
from losslab.compare.runs import Run
from losslab.train.lora import MERGED_DIR


def primary_metric(study: Study) -> tuple[str, str]:
    """(name, direction) of the study's first primary metric."""
    cfg = study.config
    name = (cfg.primary_metrics or [cfg.metrics[0].name])[0]
    direction = next(m.direction for m in cfg.metrics if m.name == name)
    return name, direction


def best_run(study: Study, runs: list[Run]) -> Run | None:
    """The best seed of the winning variant (None when no run has the metric)."""
    name, direction = primary_metric(study)
    sign = 1.0 if direction == "max" else -1.0

    def value(run: Run) -> float:
        v = run.metrics.get(name)
        return sign * float(v) if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf

    best: tuple[float, list[Run]] | None = None
    for variant in study.config.variants:
        scored = [r for r in runs if r.variant == variant.name and value(r) > -math.inf]
        if not scored:
            continue
        mean = sum(value(r) for r in scored) / len(scored)
        if best is None or mean > best[0]:
            best = (mean, scored)
    return None if best is None else max(best[1], key=value)  # (the first on ties)


def keep_models(study: Study, runs: list[Run]) -> list[Path]:
    """Delete the final models (``model/``, ``model_merged/``) the study's ``keep_models`` does not
    keep (runs and tuning trials); returns the run folders whose model is kept."""
    mode = study.config.keep_models
    if mode == "all":
        return [r.dir for r in runs if (r.dir / "model").is_dir()]
    best = best_run(study, runs) if mode == "best" else None
    kept = [best.dir] if best is not None and (best.dir / "model").is_dir() else []
    folders = [r.dir for r in runs] + sorted((study.out / "tuning").glob("*/trial*"))
    for folder in folders:
        if folder not in kept:
            drop_model(folder)
    return kept


MODEL_DIRS = ("model", MERGED_DIR)
"""The folders of a run that hold a final model: ``model/`` and, for LoRA with ``merge: true``,
the merged full model."""


def drop_model(folder: Path) -> None:
    """Delete ``folder``'s final models (:data:`MODEL_DIRS`; each renamed first: a kill mid-way
    leaves no half model under its own name)."""
    for name in MODEL_DIRS:
        model, doomed = folder / name, folder / f".deleting-{name}"
        if doomed.is_dir():  # left by a kill during an earlier delete
            shutil.rmtree(doomed)
        if model.is_dir():
            model.rename(doomed)
            shutil.rmtree(doomed)
