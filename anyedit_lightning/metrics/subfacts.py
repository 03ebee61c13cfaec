"""Sub-fact hits: does a generated answer state a sub-question's answer at all?

ROUGE-L recall against a one- or two-word sub-answer is coarse; a hit is easier to read. Both texts are
lower-cased, punctuation becomes space, stopwords are dropped; a hit is when at least ``MIN_SHARE``
(half) of the sub-answer's distinct content words appear among the prediction's words. A sub-answer
made only of stopwords keeps all its words.
"""

from __future__ import annotations

import re

from .text import PerItemScore, Texts, as_text_pairs

MIN_SHARE = 0.5
STOPWORDS = frozenset(
    """a an the and or but nor of in on at to for from by with without as into onto over under about
    is are was were be been being am do does did has have had it its this that these those there
    their his her he she they them we you i me my our your who whom which what when where why how
    not no so than then too very can could will would shall should may might must also just only""".split()
)
_PUNCT = re.compile(r"[^\w\s]|_")


def words(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def content_words(text: str) -> set[str]:
    """Distinct non-stopwords of ``text`` (all its words when every one is a stopword)."""
    all_words = set(words(text))
    return (all_words - STOPWORDS) or all_words


def subfact_hit(prediction: str, answer: str, min_share: float = MIN_SHARE) -> bool:
    wanted = content_words(answer)
    if not wanted:
        return False
    found = len(wanted & set(words(prediction)))
    return found / len(wanted) >= min_share


class SubFactHits(PerItemScore):
    """Share of sub-questions whose answer is a hit; ``per_item()`` gives each sub-question's 0/1."""

    def __init__(self, min_share: float = MIN_SHARE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.min_share = min_share

    def update(self, predictions: Texts, answers: Texts) -> None:
        preds, refs = as_text_pairs(predictions, answers)
        self._append([float(subfact_hit(p, r, self.min_share)) for p, r in zip(preds, refs)])
