"""EditEverything (AnyEdit paper): long-form edits across formats, reported per category."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .datamodule import BenchmarkDataModule
from .records import BenchmarkRecord, question_answer_record


class EditEverythingDataModule(BenchmarkDataModule):
    """``data/editevery.json`` (552 records): prompt = ``question``, target = ``answer``.

    ``category`` (math, code, poetry, news, physics, chemistry, biology) is required because results
    are reported per category. There are no paraphrases or sub-questions.
    """

    name = "editeverything"
    default_file = "editevery.json"

    def convert(self, record: Mapping[str, Any], index: int) -> BenchmarkRecord:
        return question_answer_record(record, index, self.name, required=("category",))
