"""UnKEBench (Deng et al., 2024): unstructured long-form answers probed by sub-questions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .datamodule import BenchmarkDataModule
from .records import BenchmarkRecord, question_answer_record


class UnKEBenchDataModule(BenchmarkDataModule):
    """``data/UnKE/final_data_v2.json`` (1000 records): prompt = ``question``, target = ``answer``.

    The paraphrase (``para_question``) and the ``sub_question``/``sub_answer`` pairs are required:
    every UnKEBench metric needs them, so a record without them is reported, not half-used.
    """

    name = "unkebench"
    default_file = "UnKE/final_data_v2.json"

    def convert(self, record: Mapping[str, Any], index: int) -> BenchmarkRecord:
        return question_answer_record(
            record, index, self.name, required=("para_question", "sub_question", "sub_answer")
        )
