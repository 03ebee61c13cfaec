"""Where the library keeps its caches (model copies, covariance statistics) and finds the checkout's ``data/``."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ANYEDIT_CACHE"
DATA_ENV = "ANYEDIT_DATA"


def cache_dir(*parts: str) -> Path:
    """The cache root (``$ANYEDIT_CACHE`` or ``~/.cache/anyedit_lightning``), created on demand."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "anyedit_lightning"
    )
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_data_dir() -> Path:
    """The folder holding the shipped data files: ``$ANYEDIT_DATA``, else the checkout's ``data/``.

    The files ship with the source tree, not the wheel, so an installed package may not have them.
    """
    override = os.environ.get(DATA_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${DATA_ENV} is set to {override!r}, which is not a folder.")
        return path
    path = Path(__file__).resolve().parents[2] / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"The data folder was not found at {path}. The data files ship with the source "
            f"checkout, not the installed package: set ${DATA_ENV} to a folder laid out like the "
            "repository's data/ (see data/README.md), or pass path= to the data module."
        )
    return path
