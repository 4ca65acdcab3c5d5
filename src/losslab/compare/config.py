"""The schema of ``losslab compare`` configs, and resolving a variant x seed into a TrainConfig.

A study is a base training config, named variants (dotted-key overrides of the base, and an
optional search space to tune on validation), seeds, and the metrics compared with their
direction. Everything is validated before any run starts: the study itself, and every
resolved variant x seed training config (errors name file, line and field).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from losslab.compare.execution import Execution
from losslab.config import ConfigFile, OutputDir, load_yaml, read_config, validate
from losslab.data.builtin import BUILTIN_DATA_PREFIX, SPLITS
from losslab.errors import UserError
from losslab.files import hash_file
from losslab.train.config import DistillConfig, TrainConfig
from losslab.train.task import get_task, plan_loss


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Param(_Section):
    """One dimension of a search space."""

    type: Literal["float", "int", "categorical"] = Field("float", description="float, int or categorical")
    low: float | None = Field(None, description="float/int: lower bound")
    high: float | None = Field(None, description="float/int: upper bound")
    log: bool = Field(False, description="float/int: sample on a log scale")
    choices: list[Any] | None = Field(None, description="categorical: the values")

    @model_validator(mode="after")
    def _check(self) -> Param:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs `choices`")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError("a float/int parameter needs `low` <= `high`")
        elif self.log and self.low <= 0:
            raise ValueError("`log: true` needs `low` > 0")
        return self


class Variant(_Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9_.+-]+$", description="variant name (letters, digits, _ . + -): its runs' folder prefix"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted key of the base config -> value, e.g. {loss.terms: [...], data.mask: all}",
    )
    tune: dict[str, Param] = Field(
        default_factory=dict,
        description="dotted key -> search space; tuned on validation, the best value then run on every seed",
    )

    @field_validator("name")
    @classmethod
    def _not_dots(cls, name: str) -> str:
        if set(name) == {"."}:
            raise ValueError("a variant name cannot be only dots (it names folders under output_dir)")
        return name


class Metric(_Section):
    name: str = Field(description="a metrics.json name, e.g. test/bleu, test/accuracy, validation/loss")
    direction: Literal["max", "min"] = Field("max", description="max: higher is better; min: lower is better")


class Frontier(_Section):
    x: str = Field(description="metric on the horizontal axis (one of `metrics`), e.g. test/kl")
    y: str = Field(description="metric on the vertical axis (one of `metrics`), e.g. test/reward")


class TuningConfig(_Section):
    trials: int = Field(8, ge=1, description="Optuna trials per tuned variant")
    metric: str = Field("validation/loss", description="validation metric the tuning optimises (a metrics.json name)")
    direction: Literal["max", "min"] = Field("min", description="direction of tuning.metric")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler")
    pruner: Literal["median", "none"] = Field(
        "median",
        description="stop a trial at an evaluation where tuning.metric is worse than the median of earlier trials at that step",
    )
    storage: str | None = Field(
        None,
        description="Optuna storage: a database URL; default the journal file OUTPUT_DIR/tuning.journal "
        "(OUTPUT_DIR/tuning.db where an older study left one); shared by parallel tuning workers, resumable",
    )
    seed: int | None = Field(None, description="training seed of the tuning trials (default: the first seed)")

    @field_validator("metric")
    @classmethod
    def _validation_only(cls, metric: str) -> str:
        if not metric.startswith("validation/"):
            raise ValueError(
                f"tuning selects on the validation split: a validation/... metric, not {metric!r} "
                "(tuning on the test split would make the test results optimistic)"
            )
        return metric


class StatsConfig(_Section):
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals")
    n_bootstrap: int = Field(
        2000, ge=100, description="bootstrap resamples (CIs over seeds, paired bootstrap over test examples)"
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the marks in the report")


class CompareConfig(_Section):
    base: dict[str, Any] | None = Field(
        None, description="the base training config (a `losslab train` mapping; output_dir not needed)"
    )
    base_config: str | None = Field(None, description="or: path of a `losslab train` YAML (relative to this file)")
    variants: list[Variant] = Field(min_length=1, description="named variants of the base")
    baseline: str | None = Field(None, description="variant the others are compared against (default: the first)")
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1, description="training seeds; every variant runs every seed"
    )
    metrics: list[Metric] = Field(min_length=1, description="metrics compared, with their direction")
    primary_metrics: list[str] | None = Field(
        None,
        description="the metrics whose (variant, metric) tests form the confirmatory family that Holm's "
        "correction is taken over (default: the first of `metrics`); every other metric is a family of its own",
    )
    output_dir: OutputDir = Field(description="study folder: runs/, results.json, report.html, tuning.journal")
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    examples: int = Field(5, ge=0, description="test prompts shown side by side in the report (generation tasks)")
    frontiers: list[Frontier] = Field(
        default_factory=list,
        description="scatter plots in the report: metric y against metric x, one dot per run (variant x seed), "
        "e.g. reward against KL to the reference",
    )
    execution: Execution = Field(
        default_factory=Execution, description="where runs execute: sequential, local processes or a Ray cluster"
    )
    keep_models: Literal["none", "best", "all"] = Field(
        "best",
        description="which runs keep their final model/ once the study is in: none, best (the best seed of the "
        "winning variant by the first primary metric) or all; metrics, logs and summaries always stay",
    )
    keep_checkpoints: bool = Field(
        False,
        description="keep the checkpoint-* folders of finished runs and tuning trials "
        "(default: deleted once a run has its metrics.json or a trial has ended; model/ is kept)",
    )

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        if (self.base is None) == (self.base_config is None):
            raise ValueError("give exactly one of `base` (a mapping) or `base_config` (a path)")
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
        if self.baseline is None:
            self.baseline = names[0]
        elif self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not a variant ({', '.join(names)})")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        measured = [m.name for m in self.metrics]
        for i, name in enumerate(self.primary_metrics or []):
            if name not in measured:
                raise ValueError(
                    f"primary_metrics.{i}: {name!r} is not one of the study's metrics ({', '.join(measured)})"
                )
        if self.primary_metrics is not None and not self.primary_metrics:
            raise ValueError("primary_metrics: name at least one metric (or leave it out: the first metric)")
        for i, frontier in enumerate(self.frontiers):
            for axis in ("x", "y"):
                if getattr(frontier, axis) not in measured:
                    raise ValueError(
                        f"frontiers.{i}.{axis}: {getattr(frontier, axis)!r} is not one of the study's metrics "
                        f"({', '.join(measured)}); add it under `metrics`"
                    )
        return self


class Study:
    """A validated study: the config, its source (for error messages) and the base mapping."""

    def __init__(
        self,
        config: CompareConfig,
        base: dict[str, Any],
        *,
        source: str = "<config>",
        lines: dict[tuple[str, ...], int] | None = None,
    ) -> None:
        self.config = config
        self.base = base
        self.source = source
        self.lines = lines or {}

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.config.variants if v.name == name)

    def resolve(self, variant: Variant, seed: int, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The training config mapping of ``variant`` at ``seed`` (``params``: tuned values), without output_dir."""
        data = set_dotted(copy.deepcopy(self.base), {**variant.overrides, **(params or {})})
        data["seed"] = seed
        data.pop("output_dir", None)
        return data

    def check(self, variant: Variant, seed: int, params: dict[str, Any] | None = None) -> TrainConfig:
        """Validate a resolved config; errors point at the variant's line in the study file."""
        data = self.resolve(variant, seed, params)
        index = self.config.variants.index(variant)
        line = self.lines.get(("variants", str(index)))
        where = f"{self.source}:{line}" if line else self.source
        config = validate(TrainConfig, {**data, "output_dir": "."}, source=f"{where} (variant {variant.name!r})")
        # bad terms, and terms the task cannot feed: before the first run, not at this variant's
        plan_loss(
            config,
            where=f"{where} (variant {variant.name!r}): field 'loss.terms'",
            term_where=lambda i: f"{where} (variant {variant.name!r}): field 'loss.terms.{i}'",
        )
        return config


def corner(param: Param, bound: str) -> Any:
    """The ``low`` or ``high`` end of a parameter (first / last choice of a categorical)."""
    if param.type == "categorical":
        assert param.choices is not None  # (the Param validator requires them for categorical)
        return param.choices[0 if bound == "low" else -1]
    value = getattr(param, bound)
    return int(value) if param.type == "int" else value


ADDED_FIELDS: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("lora",), None),
    (("training", "gradient_checkpointing"), False),
    (("distill",), DistillConfig().model_dump(mode="json")),
)
"""Training-config fields added after studies were first run, with the default that leaves
training as it was: left out of :func:`config_hash` at that default, so upgrading losslab does not
rerun a finished study's runs (any other value is hashed as usual)."""


def config_hash(data: dict[str, Any]) -> str:
    """A short stable hash of a resolved training config and of the contents of its data files.

    The config is hashed with every default filled in (output_dir excluded), so a setting spelled
    out at its default gives the same run, and a default that changes between losslab versions
    gives a new one; an edited data file gives a new run too (builtin data is fixed by the pinned
    packages that ship it)."""
    complete = TrainConfig.model_validate({**data, "output_dir": "."})
    keyed: dict[str, Any] = complete.model_dump(mode="json", exclude={"output_dir"})
    for path, default in ADDED_FIELDS:  # at their default: the hash of the runs before they existed
        *parents, leaf = path
        section = keyed
        for key in parents:
            section = section.get(key) or {}
        if leaf in section and section[leaf] == default:
            del section[leaf]
    paths = {
        split: Path(spec).expanduser()
        for split, spec in (data.get("data") or {}).items()
        if split in SPLITS and isinstance(spec, str) and not spec.startswith(BUILTIN_DATA_PREFIX)
    }
    files = {split: _file_digest(path) for split, path in paths.items() if path.is_file()}
    if files:
        keyed["data_file_contents"] = files
    return digest(keyed)


def digest(value: Any) -> str:
    """A short stable hash of a JSON-like value (mapping keys in any order)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return _digest_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is read again
    return hash_file(hashlib.sha256(), Path(path)).hexdigest()


def set_dotted(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Set ``{"a.b.0.c": value}`` entries (list items by index) in place; returns ``data``."""
    for key, value in values.items():
        parts = key.split(".")
        target: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(target, list):
                if not part.isdigit() or int(part) >= len(target):
                    raise UserError(f"override {key!r}: {part!r} is not an index of a {len(target)}-item list")
                if last:
                    target[int(part)] = copy.deepcopy(value)
                else:
                    target = target[int(part)]
            elif isinstance(target, dict):
                if last:
                    target[part] = copy.deepcopy(value)
                else:
                    target = target.setdefault(part, {})
            else:
                raise UserError(
                    f"override {key!r}: {'.'.join(parts[:i])!r} is a {type(target).__name__}, not a mapping"
                )
    return data


def _check_storage(config: CompareConfig, path: str | Path, lines: dict[tuple[str, ...], int]) -> None:
    """An SQLite tuning storage is a file losslab writes: it must lie inside output_dir."""
    storage = config.tuning.storage
    if storage is None or not storage.startswith("sqlite:"):
        return
    name = storage.split(":///", 1)[-1]
    if name in ("", ":memory:"):
        return
    file = Path(name).expanduser().resolve()
    if not file.is_relative_to(Path(config.output_dir).expanduser().resolve()):
        line = lines.get(("tuning", "storage"))
        raise UserError(
            f"field 'tuning.storage': the SQLite file {str(file)!r} is outside output_dir "
            f"({config.output_dir!r}); losslab writes only inside output_dir (or use a database server URL)",
            where=f"{path}:{line}" if line else str(path),
        )


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Load and validate a study file, then every variant x seed training config (no work yet;
    LoRA targets are checked on a weightless copy of the model)."""
    from losslab.train.lora import check_lora

    file = read_config(path, overrides)
    lines = file.lines
    config = file.validate(CompareConfig)
    _check_storage(config, path, lines)
    if config.base_config is not None:
        base_path = (Path(path).parent / config.base_config).resolve()
        if not base_path.is_file():
            line = lines.get(("base_config",))
            raise UserError(
                f"field 'base_config': config file not found: {base_path}",
                where=f"{path}:{line}" if line else str(path),
            )
        base, _ = load_yaml(base_path)
    else:
        base = config.base or {}
    study = Study(config, base, source=str(path), lines=lines)
    for variant in config.variants:
        for seed in config.seeds:
            trained = study.check(variant, seed)
        line = lines.get(("variants", str(config.variants.index(variant))))
        place = f"{path}:{line}" if line else str(path)
        check_lora(trained, where=f"{place} (variant {variant.name!r}): field 'lora.target_modules'")
        for bound in ("low", "high"):  # the search space's corners must make valid configs too
            if variant.tune:
                study.check(variant, config.seeds[0], {k: corner(p, bound) for k, p in variant.tune.items()})
        if variant.tune and "validation" not in trained.eval.splits:
            raise UserError(
                f"variant {variant.name!r} is tuned on {config.tuning.metric!r} but does not evaluate the "
                f"validation split (eval.splits: {trained.eval.splits}); add validation to eval.splits",
                where=file.where("variants", str(config.variants.index(variant))),
            )
        for metric in config.metrics:
            split = metric.name.split("/", 1)[0]
            if "/" in metric.name and split in ("validation", "test") and split not in trained.eval.splits:
                raise UserError(
                    f"metric {metric.name!r}: variant {variant.name!r} does not evaluate the {split} split "
                    f"(eval.splits: {trained.eval.splits})",
                    where=str(path),
                )
        check_metric_names(file, config, variant, trained)
    return study


# what ``losslab train`` adds to every task's metrics.json (losslab.train.run.train)
RUN_METRICS = frozenset({"train/steps", "train/nonfinite_steps"})


def produced_metrics(config: TrainConfig) -> set[str]:
    """The metrics.json names a run of ``config`` writes (``split/*``: one per class or entity type)."""
    return set(RUN_METRICS) | get_task(config.task).metric_names(config)


def metric_matches(name: str, produced: set[str]) -> bool:
    """``name`` is one of ``produced``, or fills a ``prefix/*`` entry of it."""
    return name in produced or any(
        p.endswith("/*") and name.startswith(p[:-1]) and len(name) > len(p) - 1 for p in produced
    )


def check_metric_names(file: ConfigFile, config: CompareConfig, variant: Variant, trained: TrainConfig) -> None:
    """Every metric the study compares (and tunes on) is one the variant's runs write: a typo is
    found before the first run, not after the last."""
    produced = produced_metrics(trained)
    wanted: list[tuple[str, tuple[str, ...]]] = [
        (metric.name, ("metrics", str(i), "name")) for i, metric in enumerate(config.metrics)
    ]
    if variant.tune:
        wanted.append((config.tuning.metric, ("tuning", "metric")))
    for name, loc in wanted:
        if not metric_matches(name, produced):
            raise UserError(
                f"metric {name!r} is not produced by variant {variant.name!r} (task {trained.task}); "
                f"its runs give: {', '.join(sorted(produced))}",
                where=file.where(*loc),
            )
