"""A user's own edits, in the UnKEBench schema, from a JSON list or a JSONL file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .datamodule import BenchmarkDataModule, DataOptions
from .records import BenchmarkRecord, question_answer_record, require_text

if TYPE_CHECKING:
    from typing_extensions import Unpack

CUSTOM_SUFFIXES = (".json", ".jsonl")


class CustomDataModule(BenchmarkDataModule):
    """Edits from ``path``: each record needs ``question`` and ``answer`` (or ``EditRequest``'s names,
    ``prompt`` and ``target``).

    Optional: ``para_question``, ``sub_question`` with a matching ``sub_answer`` list, ``category``
    and ``id`` (default: the record's position). ``.json`` holds a list of objects (or an object whose
    ``records`` is that list, like ``data/fictional_edits.json``), ``.jsonl`` one object per line. Bad
    records are reported by position (for JSONL: among non-blank lines).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        **options: Unpack[DataOptions],
    ) -> None:
        if Path(path).suffix.lower() not in CUSTOM_SUFFIXES:
            raise ValueError(f"custom edit files must end in .json or .jsonl, got {os.fspath(path)!r}")
        super().__init__(path, **options)
        self.name = f"custom:{Path(path).name}"

    def convert(self, record: Mapping[str, Any], index: int) -> BenchmarkRecord:
        if isinstance(record, Mapping) and "question" not in record and "answer" not in record:
            aliases = {"prompt": "question", "target": "answer"}
            for name in aliases:  # a missing field is named as the record names the other one
                require_text(record, name)
            record = {aliases.get(k, k): v for k, v in record.items()}
        return question_answer_record(record, index, self.name)
