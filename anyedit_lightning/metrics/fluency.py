"""Fluency: is a generated answer degenerate (the same few words or characters looping)?

An edit that damages the model often makes it loop ("A.A.A.A…", "the cat the cat …"). The score is the
share of repeated 4-grams: ``1 - distinct 4-grams / 4-grams`` over lower-cased word-and-punctuation
tokens; an answer with fewer than ``MIN_WORD_TOKENS`` such tokens is scored on character 4-grams
instead (a run of one letter is one "word"). An answer is degenerate when the score exceeds
``DEGENERATE_THRESHOLD``; ordinary prose and code stay far below it (see ``docs/faithful.md``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

N = 4
MIN_WORD_TOKENS = 12
DEGENERATE_THRESHOLD = 0.5
_TOKEN = re.compile(r"\w+|[^\w\s]")


def fluency_tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks (``"A.A."`` -> ``a . a .``)."""
    return _TOKEN.findall(text.lower())


def _repeated_share(units: Sequence[str], n: int) -> float:
    grams = list(zip(*(units[i:] for i in range(n))))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repetition(text: str, n: int = N) -> float:
    """Share of repeated ``n``-grams (0: none repeats, near 1: one n-gram looping)."""
    tokens = fluency_tokens(text)
    if len(tokens) >= MIN_WORD_TOKENS:
        return _repeated_share(tokens, n)
    return _repeated_share(list(" ".join(text.lower().split())), n)


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct ``n``-grams over all ``n``-grams of the tokens (1.0 for texts too short to have any)."""
    tokens = fluency_tokens(text)
    grams = list(zip(*(tokens[i:] for i in range(n))))
    return len(set(grams)) / len(grams) if grams else 1.0


def is_degenerate(text: str, threshold: float = DEGENERATE_THRESHOLD) -> bool:
    return repetition(text) > threshold


class Fluency(Metric):
    """Over answers: ``{"repetition": mean score, "degenerate": share flagged, "distinct2": mean}``."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, threshold: float = DEGENERATE_THRESHOLD, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        for name in ("repetition", "degenerate", "distinct2", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, texts: str | Sequence[str]) -> None:
        for text in [texts] if isinstance(texts, str) else texts:
            score = repetition(text)
            self.repetition += score
            self.degenerate += float(score > self.threshold)
            self.distinct2 += distinct_n(text, 2)
            self.count += 1.0

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        if n <= 0:
            nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)
            return {"repetition": nan, "degenerate": nan, "distinct2": nan}
        return {
            "repetition": self.repetition / n,
            "degenerate": self.degenerate / n,
            "distinct2": self.distinct2 / n,
        }
