"""The predictions file: one JSON line per finished record, the key that makes a run resumable, and the
merge of the per-rank files a multi-process run writes."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..storage.integrity import finite_json

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"


def record_key(record: Mapping[str, Any]) -> tuple[str, bool, str, int]:
    """``(method, anyedit, benchmark, index)``: what identifies a finished request for resuming."""
    method = str(record["method"])
    return (
        method,
        bool(record["anyedit"]) and method != "none",
        str(record["benchmark"]),
        int(record["index"]),
    )


def prediction_files(out: str | os.PathLike[str]) -> list[Path]:
    """The merged predictions file and any per-rank files left by a multi-device run."""
    out = Path(out)
    return [p for p in [out / PREDICTIONS, *sorted(out.glob("predictions.rank*.jsonl"))] if p.is_file()]


def read_records(paths: Path | Iterable[Path]) -> list[dict[str, Any]]:
    """Records from JSONL files, the last one per key winning; unreadable lines (a killed write) are skipped."""
    if isinstance(paths, Path):
        paths = [paths]
    records: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        if not path.is_file():
            continue
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key = record_key(record)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.warning("Skipping unreadable line %d of %s (an interrupted write?)", number, path)
                    continue
                records[key] = record
    return list(records.values())


class PredictionWriter:
    """Appends one JSON line per record and flushes it, so a killed run keeps every finished record."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size:
            with path.open("rb") as handle:
                handle.seek(-1, os.SEEK_END)
                torn = handle.read(1) != b"\n"
            if torn:  # a write cut short: start the next record on its own line
                with path.open("a", encoding="utf-8") as handle:
                    handle.write("\n")

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(finite_json(record), ensure_ascii=False, allow_nan=False)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()


def merge_rank_files(out: str | os.PathLike[str]) -> Path:
    """Fold ``predictions.rank*.jsonl`` into ``predictions.jsonl`` (no duplicates) and delete them."""
    out = Path(out)
    target = out / PREDICTIONS
    ranks = sorted(out.glob("predictions.rank*.jsonl"))
    if not ranks:
        return target
    have = {record_key(r) for r in read_records(target)}
    writer = PredictionWriter(target)
    for record in read_records(ranks):
        if record_key(record) not in have:
            writer.write(record)
            have.add(record_key(record))
    for path in ranks:
        path.unlink()
    return target
