"""The DataModule every benchmark shares: options, the dev/test split, bad-record reports, dataloaders.

Each benchmark only says how one raw record maps onto a :class:`~.records.BenchmarkRecord`
(``convert``); everything else lives here so the benchmarks cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

from lightning import LightningDataModule
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..core.requests import EditRequest, RequestError, tokenize_request
from ..storage.paths import default_data_dir
from .records import (
    DEV_SIZE,
    BenchmarkDataError,
    BenchmarkRecord,
    InvalidRecord,
    Split,
    convert_records,
    load_raw_records,
    select_positions,
)


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def collate_requests(batch: list[EditRequest]) -> list[EditRequest]:
    """Keep a batch as a plain list: requests are text, tokenized later by the editor."""
    return list(batch)


# --------------------------------------------------------------------------- the data module


class DataOptions(TypedDict, total=False):
    """The keyword options every benchmark data module takes (see :class:`BenchmarkDataModule`)."""

    start: int
    limit: int | None
    split: Split
    batch_size: int
    skip_invalid: bool


class BenchmarkDataModule(LightningDataModule):
    """Common options and loaders for every benchmark; subclasses define ``convert`` and the file.

    Args:
        path: the data file; default: the benchmark's file under :func:`default_data_dir`.
        start: first record position to use (absolute, 0-based).
        limit: how many positions from ``start`` to use (None: to the end).
        split: ``"dev"`` (positions < 20, for tuning), ``"test"`` (positions >= 20) or ``"all"``.
        batch_size: edits written together per step.
        skip_invalid: skip bad records with a warning instead of raising :class:`BenchmarkDataError`.

    Whoever owns the model hands over the tokenizer and its limits later, with :meth:`connect`
    (litgpt's pattern), so the data can be built before the model is loaded.
    """

    name: str = "benchmark"
    default_file: str = ""
    """Path of the shipped file relative to the data folder."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        start: int = 0,
        limit: int | None = None,
        split: Split = "all",
        batch_size: int = 1,
        skip_invalid: bool = False,
    ) -> None:
        super().__init__()
        _check_batch_size(batch_size)
        select_positions(0, start, limit, split)  # validate the options now, not at setup
        self.path = None if path is None else Path(path).expanduser()
        self.start, self.limit, self.split = start, limit, split
        self.batch_size = batch_size
        self.skip_invalid = skip_invalid
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.max_length: int | None = None
        self._records: list[BenchmarkRecord] | None = None

    def connect(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
    ) -> None:
        """Settings known only once the model is: call before the records are read.

        With ``tokenizer`` and ``max_length`` (e.g. the model's context), a record whose tokenized
        prompt + target is longer is reported as a bad record at setup, with the others, instead of
        failing its edit later. ``None`` keeps the current value; records already read are read again.
        """
        if batch_size is not None:
            _check_batch_size(batch_size)
            self.batch_size = batch_size
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if max_length is not None:
            self.max_length = max_length
        self._records = None

    def convert(self, record: Mapping[str, Any], index: int) -> BenchmarkRecord:
        """Map one raw record to a :class:`BenchmarkRecord`, raising :class:`InvalidRecord` if malformed."""
        raise NotImplementedError

    def resolve_path(self) -> Path:
        """The file to read: ``path`` if given, else the shipped default; either must exist."""
        path = self.path if self.path is not None else default_data_dir() / self.default_file
        if not path.is_file():
            raise FileNotFoundError(f"{self.name}: data file not found at {path}")
        return path

    def setup(self, stage: str | None = None) -> None:
        """Read and check the selected records (once; later calls reuse them)."""
        if self._records is not None:
            return
        path = self.resolve_path()
        raw = load_raw_records(path)
        positions = select_positions(len(raw), self.start, self.limit, self.split)
        if not positions:  # a run over nothing would "succeed" with n = 0
            raise BenchmarkDataError(
                f"start={self.start}, limit={self.limit}, split={self.split!r} select no records: {path} has "
                f"{len(raw)} record(s) (positions 0..{len(raw) - 1}; dev: < {DEV_SIZE})."
            )
        self._records = convert_records(
            raw, positions, self._convert_checked, f"{self.name} ({path})", self.skip_invalid
        )

    def _convert_checked(self, record: Mapping[str, Any], index: int) -> BenchmarkRecord:
        """``convert``, plus the length check once :meth:`connect` gave a tokenizer and ``max_length``."""
        converted = self.convert(record, index)
        if self.tokenizer is None or self.max_length is None:
            return converted
        try:
            length = len(tokenize_request(self.tokenizer, converted.to_request()))
        except RequestError as e:
            raise InvalidRecord(str(e)) from e
        if length > self.max_length:
            raise InvalidRecord(
                f"prompt + target is {length} tokens long, more than max_length ({self.max_length})"
            )
        return converted

    @property
    def records(self) -> list[BenchmarkRecord]:
        """The selected records (loads them on first use)."""
        if self._records is None:
            self.setup()
        assert self._records is not None
        return self._records

    @property
    def requests(self) -> list[EditRequest]:
        """The selected records as edit requests, in file order."""
        return [record.to_request() for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def _dataloader(self) -> DataLoader[EditRequest]:
        return DataLoader(
            self.requests,  # type: ignore[arg-type]  # a list is a valid map-style dataset
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate_requests,
        )

    def train_dataloader(self) -> DataLoader[EditRequest]:
        return self._dataloader()

    def predict_dataloader(self) -> DataLoader[EditRequest]:
        return self._dataloader()

    def test_dataloader(self) -> DataLoader[EditRequest]:
        return self._dataloader()
