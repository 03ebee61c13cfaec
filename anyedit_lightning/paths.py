"""Where the library keeps its caches (model copies, covariance statistics)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ANYEDIT_CACHE"


def cache_dir(*parts: str) -> Path:
    """The cache root (``$ANYEDIT_CACHE`` or ``~/.cache/anyedit_lightning``), created on demand."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "anyedit_lightning"
    )
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
