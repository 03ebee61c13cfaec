"""Benchmark datasets as Lightning data modules that yield lists of :class:`EditRequest`.

``get_datamodule("unkebench" | "akew" | "mquake_cf" | "counterfact" | "wikiupdate" |
"editeverything" | "<file>.json[l]", **options)`` picks the module; see data/README.md for sources.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..storage.paths import DATA_ENV, default_data_dir
from .akew import AKEW_FILES, AKEWDataModule
from .custom import CUSTOM_SUFFIXES, CustomDataModule
from .datamodule import BenchmarkDataModule, DataOptions, collate_requests
from .editeverything import EditEverythingDataModule
from .records import DEV_SIZE, BenchmarkDataError, BenchmarkRecord, InvalidRecord, select_positions
from .unkebench import UnKEBenchDataModule


def _akew(subset: str) -> Callable[..., BenchmarkDataModule]:
    def make(**kwargs: Any) -> BenchmarkDataModule:
        if "subset" in kwargs:
            raise TypeError(
                f"{subset!r} already names the AKEW subset; use get_datamodule('akew', subset=...)"
            )
        return AKEWDataModule(subset=subset, **kwargs)

    return make


DATAMODULES: dict[str, Callable[..., BenchmarkDataModule]] = {
    "unkebench": UnKEBenchDataModule,
    "akew": AKEWDataModule,
    **{subset: _akew(subset) for subset in AKEW_FILES},
    "editeverything": EditEverythingDataModule,
}


def get_datamodule(name: str | os.PathLike[str], **kwargs: Any) -> BenchmarkDataModule:
    """The data module for a benchmark name, or a :class:`CustomDataModule` for a .json/.jsonl path."""
    key = os.fspath(name)
    if key.lower() in DATAMODULES:
        return DATAMODULES[key.lower()](**kwargs)
    if Path(key).suffix.lower() in CUSTOM_SUFFIXES:
        return CustomDataModule(key, **kwargs)
    raise ValueError(
        f"unknown benchmark {key!r}: use one of {sorted(DATAMODULES)} or a path to a .json/.jsonl file"
    )


__all__ = [
    "AKEW_FILES",
    "DATAMODULES",
    "DATA_ENV",
    "DEV_SIZE",
    "AKEWDataModule",
    "BenchmarkDataError",
    "BenchmarkDataModule",
    "BenchmarkRecord",
    "CustomDataModule",
    "DataOptions",
    "EditEverythingDataModule",
    "InvalidRecord",
    "UnKEBenchDataModule",
    "collate_requests",
    "default_data_dir",
    "get_datamodule",
    "select_positions",
]
