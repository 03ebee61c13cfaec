"""AKEW (Wu et al., 2024): counterfactual facts rewritten as unstructured paragraphs.

Only the MQuAKE-CF part ships with this project. AKEW's CounterFact and WikiUpdate files share the
``requested_rewrite`` schema but are not available offline, so the user supplies them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..storage.paths import default_data_dir
from .datamodule import BenchmarkDataModule, DataOptions
from .records import BenchmarkRecord, InvalidRecord, check_text, record_id, require_text

if TYPE_CHECKING:
    from typing_extensions import Unpack

AKEW_FILES: dict[str, str] = {
    "mquake_cf": "AKEW/MQuAKE-CF.json",
    "counterfact": "AKEW/CounterFact.json",
    "wikiupdate": "AKEW/WikiUpdate.json",
}
SHIPPED_SUBSETS = frozenset({"mquake_cf"})
NUM_SUB_QUESTIONS = 5
"""The paper scores the first five GPT-extracted triplets of each rewrite."""
PARAPHRASE_KEYS = ("paraphrase_prompts", "paraphrase_questions", "paraphrases", "paraphrase", "para_question")
"""Where a paraphrase may sit (CounterFact-style files), checked on the rewrite, then the record."""


def _rewrite(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """``requested_rewrite[0]`` (a bare object, as in ROME's CounterFact, is accepted too)."""
    rewrites = record.get("requested_rewrite")
    if isinstance(rewrites, Mapping):
        return rewrites
    if not isinstance(rewrites, list) or not rewrites:
        raise InvalidRecord("field 'requested_rewrite' must be a non-empty list of objects")
    if not isinstance(rewrites[0], Mapping):
        raise InvalidRecord("field 'requested_rewrite[0]' must be an object")
    return rewrites[0]


def _sub_questions(rewrite: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The first five triplets as questions ``prompt.format(subject)`` with answers ``target``."""
    key = "requested_rewrite[0].unsfact_triplets_GPT"
    triplets = rewrite.get("unsfact_triplets_GPT")
    if not isinstance(triplets, list) or not triplets:
        raise InvalidRecord(f"field '{key}' must be a non-empty list")
    questions, answers = [], []
    for i, triplet in enumerate(triplets[:NUM_SUB_QUESTIONS]):
        where = f"{key}[{i}]."
        if not isinstance(triplet, Mapping):
            raise InvalidRecord(f"field '{key}[{i}]' must be an object")
        prompt = require_text(triplet, "prompt", where)
        subject = require_text(triplet, "subject", where)
        if "{}" not in prompt:
            raise InvalidRecord(f"field '{where}prompt' has no '{{}}' placeholder for the subject")
        try:
            questions.append(prompt.format(subject))
        except (IndexError, KeyError, ValueError) as e:
            raise InvalidRecord(f"field '{where}prompt' cannot be formatted ({e!r})") from e
        answers.append(require_text(triplet, "target", where))
    return tuple(questions), tuple(answers)


def _paraphrase(record: Mapping[str, Any], rewrite: Mapping[str, Any]) -> str | None:
    """The first paraphrase of the question, if the file has any (CounterFact does)."""
    for level, where in ((rewrite, "requested_rewrite[0]."), (record, "")):
        for key in PARAPHRASE_KEYS:
            value = level.get(key)
            if value is None:
                continue
            if isinstance(value, list):
                return check_text(value[0], f"{where}{key}[0]") if value else None
            return check_text(value, f"{where}{key}")
    return None


class AKEWDataModule(BenchmarkDataModule):
    """An AKEW subset: prompt = ``requested_rewrite[0].question``, target = its ``fact_new_uns``.

    Args:
        subset: ``"mquake_cf"`` (shipped), ``"counterfact"`` or ``"wikiupdate"`` (supply the file).
        path: the subset's file; default ``data/AKEW/<MQuAKE-CF|CounterFact|WikiUpdate>.json``.
        Other options as in :class:`BenchmarkDataModule`.
    """

    def __init__(
        self,
        subset: str = "mquake_cf",
        path: str | os.PathLike[str] | None = None,
        **options: Unpack[DataOptions],
    ) -> None:
        if subset not in AKEW_FILES:
            raise ValueError(f"unknown AKEW subset {subset!r}; choose one of {sorted(AKEW_FILES)}")
        super().__init__(path, **options)
        self.subset = subset
        self.name = f"akew-{subset}"
        self.default_file = AKEW_FILES[subset]

    def resolve_path(self) -> Path:
        if self.path is None and self.subset not in SHIPPED_SUBSETS:
            expected = default_data_dir() / self.default_file
            if not expected.is_file():
                raise FileNotFoundError(
                    f"AKEW {self.subset} data is not shipped with this project (it is not available "
                    f"offline); it is expected at {expected}. Get {Path(self.default_file).name} from "
                    "AKEW (Wu et al., 2024) or jianghoucheng/AnyEdit data/AKEW/, then place it there "
                    f"or pass its location with AKEWDataModule(subset={self.subset!r}, path=...)."
                )
        return super().resolve_path()

    def convert(self, record: Mapping[str, Any], index: int) -> BenchmarkRecord:
        rewrite = _rewrite(record)
        where = "requested_rewrite[0]."
        prompt = require_text(rewrite, "question", where)
        target = require_text(rewrite, "fact_new_uns", where)
        sub_questions, sub_answers = _sub_questions(rewrite)
        return BenchmarkRecord(
            id=record_id(record, "case_id" if "case_id" in record else "id", index),
            index=index,
            benchmark=self.name,
            prompt=prompt,
            target=target,
            para_prompt=_paraphrase(record, rewrite),
            sub_questions=sub_questions,
            sub_answers=sub_answers,
        )
