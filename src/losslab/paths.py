"""Where losslab keeps and finds files: its cache folders and the installed packages that ship
builtin models and datasets.

The cache (``$LOSSLAB_CACHE``, else ``~/.cache/losslab``) holds ``models/`` (builtin models as
plain checkpoints), ``data/`` (the prepared builtin datasets), ``downloads/`` (archives fetched
once), ``prepared/`` (masked samples of record files, built in several processes) and
``reference/`` (a preference reference model's log-probs, computed once per fingerprint).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from losslab.errors import UserError


def cache_dir() -> Path:
    """Root of losslab's caches: ``$LOSSLAB_CACHE``, else ``~/.cache/losslab``."""
    return Path(os.environ.get("LOSSLAB_CACHE", Path.home() / ".cache" / "losslab")).expanduser()


def models_cache() -> Path:
    """Builtin models materialised as plain checkpoints: ``cache_dir()/models``."""
    return cache_dir() / "models"


def data_cache() -> Path:
    """The prepared builtin datasets (``losslab data prepare``): ``cache_dir()/data``."""
    return cache_dir() / "data"


def downloads_cache() -> Path:
    """Archives fetched once from a package index: ``cache_dir()/downloads``."""
    return cache_dir() / "downloads"


def prepared_cache() -> Path:
    """Masked samples built from record files in several processes: ``cache_dir()/prepared``."""
    return cache_dir() / "prepared"


def reference_cache() -> Path:
    """Reference-model log-probs precomputed for preference training: ``cache_dir()/reference``."""
    return cache_dir() / "reference"


def package_dir(package: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the package {pip_name!r} is not installed; run `pip install --no-deps {pip_name}` "
            "(or `make demo`, which installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))
