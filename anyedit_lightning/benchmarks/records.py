"""What every benchmark shares: finding the data, reading JSON/JSONL, checking records, slicing.

Each benchmark only says how one raw record maps onto a :class:`BenchmarkRecord`; everything
else (the options, the dev/test split, reporting bad records, the dataloaders) lives in
:class:`BenchmarkDataModule` so the benchmarks cannot drift apart.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..core.requests import EditRequest

DEV_SIZE = 20
"""The first ``DEV_SIZE`` records of each file (by position) are for tuning; the rest for reporting."""

Split = Literal["dev", "test", "all"]
SPLITS: tuple[str, ...] = ("dev", "test", "all")


class BenchmarkDataError(ValueError):
    """Records in a benchmark file are malformed; ``problems`` holds ``(index, reason)`` pairs."""

    def __init__(self, message: str, problems: Sequence[tuple[int, str]] = ()) -> None:
        super().__init__(message)
        self.problems: list[tuple[int, str]] = list(problems)


class InvalidRecord(ValueError):
    """Raised by a record converter; the reason names the offending field."""


@dataclass(frozen=True)
class BenchmarkRecord:
    """One benchmark item in the common shape every benchmark is converted to.

    Attributes:
        id: the record's own id (``id`` / ``case_id``), else its position.
        index: position in the file (0-based), which is what ``start``/``limit``/``split`` refer to.
        benchmark: the dataset name (``unkebench``, ``akew-mquake_cf``, ...).
        prompt: the question the edit should answer.
        target: the new long-form answer.
        para_prompt: a paraphrase of ``prompt`` for generalization checks, if the benchmark has one.
        sub_questions: questions probing facts inside ``target``; ``sub_answers`` are their answers.
        category: the reporting group (EditEverything), if any.
    """

    id: Any
    index: int
    benchmark: str
    prompt: str
    target: str
    para_prompt: str | None = None
    sub_questions: tuple[str, ...] = field(default=())
    sub_answers: tuple[str, ...] = field(default=())
    category: str | None = None

    def to_request(self) -> EditRequest:
        """The edit request, carrying the evaluation fields in ``extra``."""
        return EditRequest(
            prompt=self.prompt,
            target=self.target,
            extra={
                "id": self.id,
                "index": self.index,
                "benchmark": self.benchmark,
                "para_prompt": self.para_prompt,
                "sub_questions": list(self.sub_questions),
                "sub_answers": list(self.sub_answers),
                "category": self.category,
            },
        )


# --------------------------------------------------------------------------- reading files


@dataclass(frozen=True)
class _UnreadableLine:
    """A JSONL line that is not JSON: kept in place so it is reported like any other bad record."""

    reason: str


def load_raw_records(path: Path) -> list[Any]:
    """The records of a ``.json`` file (a list) or a ``.jsonl`` file (one object per non-blank line)."""
    if path.suffix.lower() == ".jsonl":
        records: list[Any] = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    records.append(_UnreadableLine(f"line {line_no} is not valid JSON ({e.msg})"))
        return records
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(f"{path} is not valid JSON: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("records"), list):
        return data["records"]  # a list with a note beside it (``about``, ...)
    if not isinstance(data, list):
        raise BenchmarkDataError(
            f"{path} must hold a JSON list of records (or an object whose 'records' is one), got "
            f"{type(data).__name__}; use a .jsonl file for one record per line."
        )
    return data


# --------------------------------------------------------------------------- field checks


def require_text(record: Mapping[str, Any], key: str, where: str = "") -> str:
    """``record[key]`` as a non-blank string, else :class:`InvalidRecord` naming the field."""
    name = f"{where}{key}"
    if key not in record or record[key] is None:
        raise InvalidRecord(f"field '{name}' is missing")
    return check_text(record[key], name)


def check_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidRecord(f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRecord(f"field '{name}' is empty or whitespace-only")
    return value


def optional_text(record: Mapping[str, Any], key: str) -> str | None:
    """``record[key]`` when present and not null (then it must be non-blank text), else None."""
    return None if record.get(key) is None else check_text(record[key], key)


def text_list(record: Mapping[str, Any], key: str, required: bool = True) -> tuple[str, ...]:
    """``record[key]`` as a list of non-blank strings; an absent optional field is empty."""
    if record.get(key) is None:
        if required:
            raise InvalidRecord(f"field '{key}' is missing")
        return ()
    value = record[key]
    if not isinstance(value, list):
        raise InvalidRecord(f"field '{key}' must be a list of strings, got {type(value).__name__}")
    return tuple(check_text(item, f"{key}[{i}]") for i, item in enumerate(value))


def record_id(record: Mapping[str, Any], key: str, index: int) -> Any:
    """The record's own id (a string or integer), else its position."""
    value = record.get(key)
    if value is None:
        return index
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidRecord(f"field '{key}' must be a string or integer, got {type(value).__name__}")
    return value


def paired_lists(
    record: Mapping[str, Any], questions: str, answers: str, required: bool
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sub-questions and their answers, which must line up one to one."""
    qs, ans = text_list(record, questions, required), text_list(record, answers, required)
    if len(qs) != len(ans):
        raise InvalidRecord(f"'{questions}' has {len(qs)} items but '{answers}' has {len(ans)}")
    return qs, ans


def question_answer_record(
    record: Mapping[str, Any], index: int, benchmark: str, required: Sequence[str] = ()
) -> BenchmarkRecord:
    """A record in the UnKEBench schema, which EditEverything and custom files share.

    ``question`` and ``answer`` are always required; ``para_question``, ``sub_question`` /
    ``sub_answer``, ``category`` and ``id`` are optional unless named in ``required``.
    """
    unknown = set(required) - {"para_question", "sub_question", "sub_answer", "category", "id"}
    if unknown:
        raise ValueError(f"unknown required fields {sorted(unknown)}")
    prompt, target = require_text(record, "question"), require_text(record, "answer")
    for key in required:
        if record.get(key) is None:
            raise InvalidRecord(f"field '{key}' is missing")
    sub_questions, sub_answers = paired_lists(record, "sub_question", "sub_answer", required=False)
    return BenchmarkRecord(
        id=record_id(record, "id", index),
        index=index,
        benchmark=benchmark,
        prompt=prompt,
        target=target,
        para_prompt=optional_text(record, "para_question"),
        sub_questions=sub_questions,
        sub_answers=sub_answers,
        category=optional_text(record, "category"),
    )


# --------------------------------------------------------------------------- slicing


def select_positions(n: int, start: int = 0, limit: int | None = None, split: str = "all") -> range:
    """Absolute positions ``start .. start+limit-1`` (clipped to the file), restricted by ``split``.

    ``start``/``limit`` count from the file's first record, not from the split's, so a slice names
    the same records whatever the split; ``split`` only narrows it (``dev``: positions < 20).
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative integer, got {start!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    stop = n if limit is None else min(n, start + limit)
    if split == "dev":
        stop = min(stop, DEV_SIZE)
    elif split == "test":
        start = max(start, DEV_SIZE)
    return range(start, max(start, stop))


def convert_records(
    raw: Sequence[Any],
    positions: Sequence[int],
    convert: Callable[[Mapping[str, Any], int], BenchmarkRecord],
    source: str,
    skip_invalid: bool = False,
) -> list[BenchmarkRecord]:
    """Convert the selected raw records, reporting every bad one by index and reason.

    Only the selected positions are checked, so a bad record outside the slice never blocks work.
    Bad records raise :class:`BenchmarkDataError`, or with ``skip_invalid`` are left out with a warning.
    """
    records: list[BenchmarkRecord] = []
    problems: list[tuple[int, str]] = []
    for index in positions:
        item = raw[index]
        try:
            if isinstance(item, _UnreadableLine):
                raise InvalidRecord(item.reason)
            if not isinstance(item, Mapping):
                raise InvalidRecord(f"record must be a JSON object, got {type(item).__name__}")
            records.append(convert(item, index))
        except InvalidRecord as e:
            problems.append((index, str(e)))
    if problems:
        listing = "\n".join(f"  record {index}: {reason}" for index, reason in problems)
        if not skip_invalid:
            raise BenchmarkDataError(
                f"{len(problems)} bad record(s) in {source}:\n{listing}\n"
                "Fix them, or pass skip_invalid=True to skip them with a warning.",
                problems,
            )
        warnings.warn(f"Skipped {len(problems)} bad record(s) in {source}:\n{listing}", stacklevel=3)
    return records
