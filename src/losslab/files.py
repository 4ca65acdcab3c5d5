"""Reading and writing files: atomic text writes, hashing a file's bytes, strict UTF-8 reading.

Used by every package that writes results or caches (data/, masking/, train/, compare/); it
imports nothing of losslab but :mod:`losslab.errors`.
"""

from __future__ import annotations

import codecs
import os
import tempfile
from pathlib import Path
from typing import Protocol, TypeVar

from losslab.errors import UserError


class Hasher(Protocol):
    """What :func:`hash_file` needs of a ``hashlib`` object."""

    def update(self, data: bytes, /) -> None: ...


H = TypeVar("H", bound=Hasher)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a file (``text`` as UTF-8, or ``bytes`` as they are) so a reader never sees it
    half-written: a temp file ``.NAME.*`` in the same folder, renamed into place. Creates the
    parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if isinstance(text, str):
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def hash_file(digest: H, path: Path) -> H:
    """Feed the bytes of ``path`` to a ``hashlib`` object in 1 MiB blocks; returns it."""
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


def read_utf8(path: Path, advice: str = "") -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); otherwise a ``UserError``
    naming the line and byte, followed by ``advice``."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if raw.startswith(codecs.BOM_UTF8) else 0)  # counted after the BOM
        line = raw[:start].count(b"\n") + 1
        raise UserError(f"not UTF-8 (byte {start + 1}){advice}", where=f"{path}:{line}") from None
