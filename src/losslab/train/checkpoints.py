"""Checkpoints that are complete or ignored: the completion marker, finding the last complete
checkpoint, deleting incomplete ones, rotation, and cutting ``log.jsonl`` back to a resumed step
(docs/reliability.md says why a marker and not a renamed folder)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from losslab.files import write_atomic

COMPLETE_MARKER = "losslab_checkpoint.json"
"""Written last into ``checkpoint-N``: ``{"step": N, "nonfinite_steps": [...]}``."""

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-N`` folder, complete or not, by step."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def is_complete(checkpoint: str | os.PathLike[str]) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def last_complete_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The complete checkpoint with the highest step (None when there is none)."""
    done = [p for _, p in checkpoints(output_dir) if is_complete(p)]
    return str(done[-1]) if done else None


def remove_incomplete_checkpoints(output_dir: str | os.PathLike[str]) -> list[str]:
    """Delete the ``checkpoint-N`` folders a killed save left unfinished; returns their paths.
    Call it on one process only, before training."""
    removed = []
    for _, path in checkpoints(output_dir):
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def read_marker(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text(encoding="utf-8"))


def fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` (and the folder entries) to disk."""
    for path in [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def mark_complete(checkpoint: Path, info: dict[str, Any]) -> None:
    """Flush ``checkpoint`` and write its marker (temp file + rename), then flush the folder."""
    fsync_tree(checkpoint)
    write_atomic(checkpoint / COMPLETE_MARKER, json.dumps(info) + "\n")
    fsync_tree(checkpoint)


def rotate_checkpoints(output_dir: str | os.PathLike[str], keep: int | None, protect: str | None = None) -> None:
    """Delete the oldest complete checkpoints beyond ``keep`` (the newest one and ``protect``,
    the best model's, always stay). Each loses its marker first, so a kill during the deletion
    leaves an incomplete folder, never a half-deleted one that looks complete."""
    if not keep or keep <= 0:
        return
    done = [p for _, p in checkpoints(output_dir) if is_complete(p)]
    protected = {done[-1].resolve()} if done else set()
    if protect:
        protected.add(Path(protect).resolve())
    excess = len(done) - max(keep, len(protected))
    for path in done:
        if excess <= 0:
            break
        if path.resolve() in protected:
            continue
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        excess -= 1


def keep_log_rows(log: str | os.PathLike[str], checkpoint: str | None) -> None:
    """Make ``log.jsonl`` hold exactly the rows written before ``checkpoint`` was saved (its
    ``trainer_state.json`` log history has one entry per row), or none for a fresh start:
    rows of steps a killed run did after its last checkpoint, and a torn last line, go.
    Rewritten with a temp file + rename."""
    path = Path(log)
    if not path.is_file():
        return
    keep = 0
    if checkpoint is not None:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        keep = len(state.get("log_history", []))
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[:keep]:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        rows.append(line + "\n")
    write_atomic(path, "".join(rows))


# ---- processes --------------------------------------------------------------------------------
