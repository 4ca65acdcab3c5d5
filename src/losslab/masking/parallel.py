"""Building training samples from a records file in several processes, cached on disk.

``build_samples_parallel(path, tokenizer, config, num_proc=4)`` returns what
:func:`~losslab.masking.build.build_samples` returns for the same file, in the same order,
with the same :class:`BuildStats` (samples, tokens, dropped, skipped messages, strategies)
and the same :class:`UserError` for a bad record (``file:line``, field), whichever worker
met it. How:

1. the main process reads the raw records (JSON parsing stays here, so a line number is
   never lost) into an in-memory ``datasets.Dataset``;
2. ``Dataset.map(num_proc=...)`` validates and encodes each record in a worker and returns
   its sequences, its error message (if any) and its share of the statistics;
3. the main process walks the results in file order and applies ``on_error``, the sample
   limit and the statistics exactly as the single-process loop does.

The per-record results of step 2 are saved (Arrow, ``Dataset.save_to_disk``) under
``cache_dir()/prepared/FINGERPRINT``; the fingerprint covers the file's bytes, the tokenizer
(vocabulary, merges, special tokens, chat template), the mask config, the sample limit and the
source of the code that builds the samples (:data:`SAMPLE_CODE`: a fix in a development install
changes no version number), so a second run with the same inputs skips steps 1-2 and any
change rebuilds. Entries not used for :data:`KEEP_DAYS` days are deleted when a new one is
written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from losslab.data.records import SKIP_HINT, Source, UnreadableRecord, describe_validation_error, iter_raw_records
from losslab.data.schemas import ChatRecord, InstructionRecord
from losslab.errors import UserError
from losslab.files import hash_file
from losslab.labels import IGNORE_INDEX
from losslab.masking.build import BuildStats, MaskBuilder, MaskConfig, file_schema
from losslab.masking.render import load_template
from losslab.paths import prepared_cache

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

KEEP_DAYS = 30  # prepared data not used for this long are deleted when new data are prepared
CACHE_FORMAT = 2  # bump when the cached columns or their meaning change
# the modules (a package: all its files) whose code decides the cached samples and messages
SAMPLE_CODE = (
    "losslab.masking",
    "losslab.data.records",
    "losslab.data.schemas",
    "losslab.errors",
    "losslab.files",
    "losslab.labels",
)


def build_samples_parallel(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase | str,
    config: MaskConfig | None = None,
    *,
    num_proc: int = 2,
    stats: BuildStats | None = None,
    limit: int | None = None,
    cache: Path | None = None,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """:func:`~losslab.masking.build.build_samples` for a records file, in ``num_proc`` processes.

    ``cache``: the directory for prepared data (default :func:`prepared_dir`). Returns the same
    samples (dicts: ``input_ids``, ``labels``, ``weights``, ``source``) in the same order.
    """
    from datasets import Dataset

    if num_proc < 1:
        raise UserError(f"num_proc must be >= 1; got {num_proc}")
    builder = MaskBuilder(tokenizer, config)
    stats = stats if stats is not None else BuildStats()
    stats.strategy = builder.strategy.value
    path = Path(path)
    schema = file_schema(builder.config.kind, path)
    target = (cache or prepared_dir()) / fingerprint(path, builder, schema.__name__, limit)
    _touch(target)  # first: a prune by another process now sees it as used
    if (target / "dataset_info.json").is_file():
        results = Dataset.load_from_disk(str(target))
    else:
        rows = _raw_rows(path, schema, limit)
        results = Dataset.from_dict(rows).map(
            _encode_batch,
            batched=True,
            batch_size=batch_size,
            num_proc=num_proc if len(rows["line"]) > 1 else None,
            fn_kwargs={"builder": builder, "schema": schema, "file": str(path)},
            remove_columns=["raw", "bad"],
            features=_features(),
            new_fingerprint=target.name,
            desc=f"masking {path.name}",
        )
        _save(results, target)
        prune(target.parent, keep=target)
    return _assemble(results, str(path), builder.config.on_error, stats, limit)


def prepared_dir() -> Path:
    """Where prepared data are cached: ``cache_dir()/prepared`` (``$LOSSLAB_CACHE``, else ``~/.cache/losslab``)."""
    return prepared_cache()


def fingerprint(path: Path, builder: MaskBuilder, schema: str, limit: int | None) -> str:
    """A hash of everything the built samples depend on."""
    h = hashlib.sha256()

    def add(part: Any) -> None:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode()
        h.update(len(data).to_bytes(8, "little") + data)

    from losslab import __version__

    tok = builder.tokenizer
    cfg = asdict(builder.config)
    cfg.pop("on_error")  # applied when the results are read, not cached
    if cfg.get("template"):  # the text, whether given inline or as a file (contents, not its name)
        cfg["template"] = load_template(cfg["template"])
    add([CACHE_FORMAT, __version__, code_digest(), schema, limit, cfg, type(tok).__name__])
    add(tok.backend_tokenizer.to_str())
    add(
        [
            getattr(tok, "chat_template", None),
            tok.special_tokens_map,
            tok.bos_token_id,
            tok.eos_token_id,
            getattr(tok, "add_bos_token", None),
            getattr(tok, "add_eos_token", None),
        ]
    )
    return hash_file(h, path).hexdigest()[:32]


@functools.cache
def code_digest() -> str:
    """A hash of the source files of :data:`SAMPLE_CODE` (once per process)."""
    return source_digest(code_files())


def code_files() -> list[Path]:
    """The source files of :data:`SAMPLE_CODE`: every ``.py`` file of a package, a module's own file."""
    files = []
    for name in SAMPLE_CODE:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"cannot find the source of {name}")
        if spec.submodule_search_locations:
            files += sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.py"))
        else:
            files.append(Path(spec.origin))
    return files


def source_digest(files: Iterable[Path]) -> str:
    """A hash of the names and contents of ``files``."""
    h = hashlib.sha256()
    for path in files:
        for part in (path.name.encode(), path.read_bytes()):
            h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def _raw_rows(path: Path, schema: type[BaseModel], limit: int | None) -> dict[str, list[Any]]:
    """One row per raw record: its line, its JSON text (or the parse error). With ``limit``,
    the rows stop before the first valid record after the ``limit``-th, where the
    single-process loop stops (bad records before it are still reported)."""
    rows: dict[str, list[Any]] = {"line": [], "raw": [], "bad": []}
    valid = 0
    for source, raw in iter_raw_records(path):
        message = raw.message if isinstance(raw, UnreadableRecord) else None
        if limit is not None and message is None and _validation_message(schema, raw) is None:
            if valid >= limit:
                break
            valid += 1
        text = None
        if message is None:
            try:
                text = json.dumps(raw)  # ASCII: a lone surrogate stays an escape
            except TypeError:  # a csv/parquet value JSON cannot hold (a timestamp, bytes): judged here
                message = _validation_message(schema, raw)
                text = None if message else json.dumps(raw, default=str)
        rows["line"].append(source.line)
        rows["raw"].append(text)
        rows["bad"].append(message)
    return rows


def _validation_message(schema: type[BaseModel], raw: Any) -> str | None:
    """What the workers would say about ``raw`` (None: valid)."""
    if not isinstance(raw, dict):
        return f"expected a JSON object, got {type(raw).__name__}"
    try:
        schema.model_validate(raw)
        return None
    except ValidationError as exc:
        return describe_validation_error(exc)


def _features() -> Any:
    from datasets import Features, List, Value

    ints = List(List(Value("int64")))
    return Features(
        {
            "line": Value("int64"),
            "valid": Value("bool"),
            "error": Value("string"),
            "input_ids": ints,
            "labels": ints,
            "weights": List(List(Value("float64"))),
            "strategies": List(Value("string")),
            "unrendered": List(Value("string")),
            "dropped": List(Value("string")),
            "control": Value("string"),
        }
    )


def _encode_batch(
    batch: dict[str, list[Any]], *, builder: MaskBuilder, schema: type[ChatRecord | InstructionRecord], file: str
) -> dict[str, list[Any]]:
    """Validate and encode a batch of raw records (runs in a worker)."""
    out: dict[str, list[Any]] = {k: [] for k in _features() if k != "line"}
    for line, raw, bad in zip(batch["line"], batch["raw"], batch["bad"]):
        source = Source(file, line)
        stats = BuildStats()
        valid, error, sequences = False, bad, []
        if raw is not None:
            value = json.loads(raw)
            if not isinstance(value, dict):
                error = f"expected a JSON object, got {type(value).__name__}"
            else:
                try:
                    record = schema.model_validate(value)
                    valid = True
                except ValidationError as exc:
                    error = describe_validation_error(exc)
        if valid:
            try:
                sequences = builder.encode(record, source, stats)
            except UserError as exc:
                error = str(exc)
        out["valid"].append(valid)
        out["error"].append(error)
        out["input_ids"].append([s.input_ids for s in sequences])
        out["labels"].append([s.labels for s in sequences])
        out["weights"].append([s.weights for s in sequences])
        out["strategies"].append(list(stats.strategies.elements()))
        out["unrendered"].append(list(stats.unrendered.elements()))
        out["dropped"].append(list(stats.dropped.elements()))
        out["control"].append(stats.control.examples[0] if stats.control.count else None)
    return {"line": list(batch["line"]), **out}


def _touch(entry: Path) -> None:
    """Mark a cache entry as used now (its folder's mtime); a missing entry or a read-only
    cache stays as it is."""
    with contextlib.suppress(OSError):
        os.utime(entry)


# what prune may delete: entries (a fingerprint) and the temporary folders of their saves
_ENTRY = re.compile(r"[0-9a-f]{32}")
_TEMPORARY = re.compile(r"\.[0-9a-f]{32}-.+")


def prune(directory: Path, *, keep: Path | None = None, max_age_days: float = KEEP_DAYS) -> list[Path]:
    """Delete the entries of ``directory`` (prepared data) not used for ``max_age_days``, and the
    temporary folders of saves killed more than a day ago; returns what was deleted. Only
    folders named like losslab's own (a 32-hex fingerprint, ``.FINGERPRINT-*``) are touched, so
    a ``cache=`` directory shared with other files loses nothing else. Each is renamed first
    (atomic), so no process can load a half-deleted entry."""
    now, removed = time.time(), []
    for entry in sorted(directory.iterdir()):
        temporary = bool(_TEMPORARY.fullmatch(entry.name))
        if entry == keep or not entry.is_dir() or not (temporary or _ENTRY.fullmatch(entry.name)):
            continue
        limit = 86400.0 if temporary else max_age_days * 86400.0
        try:
            if now - entry.stat().st_mtime <= limit:
                continue
            doomed = entry.rename(directory / f".deleting-{entry.name.lstrip('.')}")
        except OSError:  # another process renamed or used it first
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(entry)
    for leftover in directory.glob(".deleting-*"):  # a prune killed mid-way (only prune names them so)
        if _ENTRY.fullmatch(leftover.name.removeprefix(".deleting-")[:32]):
            shutil.rmtree(leftover, ignore_errors=True)
    return removed


def _save(results: Dataset, target: Path) -> None:
    """Save atomically: a concurrent process (another rank) either wins or finds it done."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        results.save_to_disk(str(tmp))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "dataset_info.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _assemble(results: Dataset, file: str, on_error: str, stats: BuildStats, limit: int | None) -> list[dict[str, Any]]:
    """The single-process loop of :meth:`MaskBuilder.iter_sequences` over per-record results."""
    samples: list[dict[str, Any]] = []
    n = 0
    columns = results.to_dict()  # one Arrow -> Python conversion per column (rows one by one are slower)
    for values in zip(*columns.values()):
        row = dict(zip(columns, values))
        source = Source(file, row["line"])
        if not row["valid"]:
            if on_error == "raise":
                raise UserError(row["error"] + SKIP_HINT, where=str(source))
            stats.skipped.add(f"{source}: {row['error']}")
            continue
        if limit is not None and n >= limit:
            break
        n += 1
        stats.strategies.update(row["strategies"])
        stats.unrendered.update(row["unrendered"])
        stats.dropped.update(row["dropped"])
        for why in row["dropped"]:
            stats.dropped_log.add(f"{source}: sample dropped ({why.removeprefix('with ')})")
        if row["control"] is not None:
            stats.control.add(row["control"])
        if row["error"] is not None:
            if on_error == "raise":
                raise UserError(row["error"] + SKIP_HINT, where=str(source))
            stats.skipped.add(f"{source}: {row['error']}")
            continue
        stats.records += 1
        for ids, labels, weights in zip(row["input_ids"], row["labels"], row["weights"]):
            stats.samples += 1
            stats.tokens += len(ids)
            stats.trained_tokens += sum(1 for label in labels if label != IGNORE_INDEX)
            samples.append(
                {"input_ids": ids, "labels": labels, "weights": weights, "source": {"file": file, "line": row["line"]}}
            )
    return samples
