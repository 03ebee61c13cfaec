"""Shared pieces of the text metrics: input checks, n-gram counting and a per-request score base class.

The benchmark writes one row per request, so every metric keeps its per-request scores (``cat``-reduced
list states, gathered across DDP ranks) instead of only running sums.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

Texts = str | Sequence[str]


def as_text_pairs(predictions: Texts, references: Texts) -> tuple[list[str], list[str]]:
    """Normalise one string or a sequence of strings per side, checking they pair up one to one."""
    preds = [predictions] if isinstance(predictions, str) else list(predictions)
    refs = [references] if isinstance(references, str) else list(references)
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions but {len(refs)} references")
    for text in (*preds, *refs):
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
    return preds, refs


def ngram_counts(tokens: Sequence[Hashable], n: int) -> Counter[tuple[Hashable, ...]]:
    """Multiset of the ``n``-grams of ``tokens`` (empty when there are fewer than ``n`` tokens)."""
    return Counter(zip(*(tokens[i:] for i in range(n))))


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean, NaN for no values (an empty benchmark has no score, not a zero one)."""
    return sum(values) / len(values) if values else float("nan")


def scores_tensor(values: Sequence[float], device: torch.device) -> Tensor:
    """Per-request scores as float64, so stored values are the reference implementations' to the bit."""
    return torch.tensor(list(values), dtype=torch.float64, device=device)


def cat_or_empty(state: list[Tensor] | Tensor, device: torch.device) -> Tensor:
    """A list state concatenated (it is already a tensor after a DDP sync); empty when never updated."""
    if isinstance(state, list) and not state:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return dim_zero_cat(state)


class PerItemScore(Metric):
    """Mean of one score per request, keeping the per-request values (``per_item``) for the writers."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    scores: list[Tensor]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def _append(self, values: Sequence[float]) -> None:
        self.scores.append(scores_tensor(values, self.device))

    def per_item(self) -> list[float]:
        """Scores of every request seen so far, in update order (this rank's, unless inside ``sync_context``)."""
        return cat_or_empty(self.scores, self.device).tolist()

    def compute(self) -> Tensor:
        """Mean over requests (NaN before any update)."""
        scores = cat_or_empty(self.scores, self.device)
        return (
            scores.mean()
            if scores.numel()
            else torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        )
