"""BLEU-4 as AnyEdit's scorer computes it.

The paper calls ``nltk.translate.bleu_score.sentence_bleu([answer], prediction)`` on raw strings, so
every *character* is a token: its "BLEU" is a character-level BLEU-4. We reimplement that formula (NLTK
is only a test reference) and keep NLTK's quirks so numbers stay comparable with the paper's:

* uniform weights, no smoothing, brevity penalty against the (single) reference length;
* no unigram match gives exactly 0;
* a zero higher-order precision is replaced by ``sys.float_info.min`` (NLTK's "method0"), which gives
  a tiny positive score (about 1e-77 per missing order) rather than 0, e.g. for predictions shorter
  than 4 tokens.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Hashable, Sequence

from .text import PerItemScore, Texts, as_text_pairs, ngram_counts

MAX_ORDER = 4
_ZERO_PRECISION = sys.float_info.min


def bleu(prediction: Sequence[Hashable], reference: Sequence[Hashable], max_order: int = MAX_ORDER) -> float:
    """Sentence BLEU of one tokenised prediction against one tokenised reference (NLTK semantics)."""
    log_terms = []
    weight = 1.0 / max_order
    for n in range(1, max_order + 1):
        hyp_counts = ngram_counts(prediction, n)
        ref_counts = ngram_counts(reference, n)
        matches = sum(min(count, ref_counts[gram]) for gram, count in hyp_counts.items())
        if matches == 0 and n == 1:
            return 0.0
        # Modified precision; NLTK floors the denominator at 1 when there are no n-grams of this order.
        precision = matches / max(1, sum(hyp_counts.values())) if matches else _ZERO_PRECISION
        log_terms.append(weight * math.log(precision))
    return _brevity_penalty(len(prediction), len(reference)) * math.exp(math.fsum(log_terms))


def _brevity_penalty(hyp_len: int, ref_len: int) -> float:
    if hyp_len > ref_len:
        return 1.0
    if hyp_len == 0:
        return 0.0
    return math.exp(1 - ref_len / hyp_len)


def char_bleu(prediction: str, reference: str) -> float:
    """The paper's BLEU: BLEU-4 over characters (what ``sentence_bleu([ref], pred)`` gives on strings)."""
    return bleu(prediction, reference)


def word_bleu(prediction: str, reference: str) -> float:
    """BLEU-4 over whitespace-split words (the conventional reading of BLEU)."""
    return bleu(prediction.split(), reference.split())


class CharBLEU(PerItemScore):
    """Mean character-level BLEU-4 over requests; ``per_item()`` gives each request's score."""

    def update(self, predictions: Texts, references: Texts) -> None:
        preds, refs = as_text_pairs(predictions, references)
        self._append([char_bleu(p, r) for p, r in zip(preds, refs)])


class WordBLEU(PerItemScore):
    """Mean word-level BLEU-4 over requests; ``per_item()`` gives each request's score."""

    def update(self, predictions: Texts, references: Texts) -> None:
        preds, refs = as_text_pairs(predictions, references)
        self._append([word_bleu(p, r) for p, r in zip(preds, refs)])
