"""ROUGE-1/2/L recall as the ``rouge`` PyPI package (1.0.1) computes it, which AnyEdit's scorer uses.

Reimplemented (the package is a test reference only), quirks included, so scores match the paper's:

* tokens: the text is split into "sentences" on ``.``, empty pieces dropped, whitespace squeezed, then
  each sentence split on single spaces and the sentences concatenated. No lower-casing and no other
  punctuation handling; a whitespace-only piece between periods becomes an empty-string token;
* n-grams are *sets* (the package's default ``exclusive=True``): ROUGE-N recall is
  ``|distinct hyp n-grams & distinct ref n-grams| / |distinct ref n-grams|`` with n-grams running across
  sentence boundaries, and 0 when the reference has no n-gram of that order;
* ROUGE-L is the summary-level union LCS: for every (reference sentence, prediction sentence) pair one
  LCS is reconstructed with the package's tie-breaking, the *words* of all those LCSs are unioned, and
  recall is ``|union| / |distinct reference words|``.

Where the package raises or returns a meaningless value, we define the score as 0.0: a prediction or
reference with no word at all (empty, whitespace-only or only periods). The package raises
``ValueError`` for an empty side, and for a whitespace-only prediction it can even give a positive
score by matching its empty-string token against one in the reference (``"   "`` against
``"Hello. World. "`` has ROUGE-1 recall 1/3 there, 0.0 here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from .text import Texts, as_text_pairs, cat_or_empty, mean, scores_tensor

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def _sentences(text: str) -> list[str]:
    return [" ".join(piece.split()) for piece in text.split(".") if piece]


def _words(sentences: Sequence[str]) -> list[str]:
    return [word for sentence in sentences for word in sentence.split(" ")]


def _ngram_set(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return set(zip(*(words[i:] for i in range(n))))


def _ngram_recall(hyp_words: Sequence[str], ref_words: Sequence[str], n: int) -> float:
    ref_grams = _ngram_set(ref_words, n)
    if not ref_grams:
        return 0.0
    return len(_ngram_set(hyp_words, n) & ref_grams) / len(ref_grams)


def _lcs_words(ref: Sequence[str], hyp: Sequence[str]) -> set[str]:
    """Words of one longest common subsequence, backtracked exactly as the package does.

    Which LCS is picked matters because only its distinct words enter the union; iterative, so long
    sentences do not hit Python's recursion limit as the package does.
    """
    table = [[0] * (len(hyp) + 1)]
    for ref_word in ref:
        prev, row = table[-1], [0]
        for j, hyp_word in enumerate(hyp):
            row.append(prev[j] + 1 if ref_word == hyp_word else max(prev[j + 1], row[j]))
        table.append(row)
    words: set[str] = set()
    i, j = len(ref), len(hyp)
    while i and j:
        if ref[i - 1] == hyp[j - 1]:
            words.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def _union_lcs_recall(hyp_sentences: Sequence[str], ref_sentences: Sequence[str]) -> float:
    hyp_split = [sentence.split(" ") for sentence in hyp_sentences]
    union: set[str] = set()
    for ref_sentence in ref_sentences:
        ref_split = ref_sentence.split(" ")
        ref_vocab = set(ref_split)
        for hyp in hyp_split:
            if not ref_vocab.isdisjoint(hyp):  # no common word, empty LCS
                union |= _lcs_words(ref_split, hyp)
    return len(union) / len(set(_words(ref_sentences)))


def rouge_recall(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L recall of ``prediction`` against ``reference`` (0.0 if either has no word)."""
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not any(hyp) or not any(ref):
        return dict.fromkeys(ROUGE_KEYS, 0.0)
    hyp_words, ref_words = _words(hyp), _words(ref)
    return {
        "rouge1": _ngram_recall(hyp_words, ref_words, 1),
        "rouge2": _ngram_recall(hyp_words, ref_words, 2),
        "rougeL": _union_lcs_recall(hyp, ref),
    }


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of one prediction (how the editors score a single edit)."""
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not any(hyp) or not any(ref):
        return 0.0
    return _union_lcs_recall(hyp, ref)


class _RougeStates(Metric):
    """Per-request ROUGE-1/2/L recall lists, with dict-valued ``compute`` and ``per_item``."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for key in ROUGE_KEYS:
            self.add_state(key, default=[], dist_reduce_fx="cat")

    def _append(self, rows: Sequence[dict[str, float]]) -> None:
        for key in ROUGE_KEYS:
            getattr(self, key).append(scores_tensor([row[key] for row in rows], self.device))

    def per_item(self) -> list[dict[str, float]]:
        """One ``{'rouge1', 'rouge2', 'rougeL'}`` dict per request, in update order (this rank's)."""
        columns = [cat_or_empty(getattr(self, key), self.device).tolist() for key in ROUGE_KEYS]
        return [dict(zip(ROUGE_KEYS, values)) for values in zip(*columns)]

    def compute(self) -> dict[str, Tensor]:
        """Means over requests (NaN before any update)."""
        out = {}
        for key in ROUGE_KEYS:
            scores = cat_or_empty(getattr(self, key), self.device)
            out[key] = (
                scores.mean()
                if scores.numel()
                else torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
            )
        return out


class RougeRecall(_RougeStates):
    """Mean ROUGE-1/2/L recall over requests, as the ``rouge`` package scores them (see module doc)."""

    def update(self, predictions: Texts, references: Texts) -> None:
        preds, refs = as_text_pairs(predictions, references)
        self._append([rouge_recall(p, r) for p, r in zip(preds, refs)])


SubQuestions = Sequence[tuple[str, str]]


class SubQuestionRouge(_RougeStates):
    """Per request, mean ROUGE recall over its sub-questions' (prediction, answer) pairs; then mean over requests.

    ``update(requests)`` takes one list of ``(prediction, answer)`` pairs per request, or
    ``update(predictions, answers)`` two parallel lists of per-request lists. A request without
    sub-questions is an error: it has no score, and silently dropping it would misalign ``per_item``.
    """

    def update(
        self,
        requests: Sequence[SubQuestions] | Sequence[Sequence[str]],
        answers: Sequence[Sequence[str]] | None = None,
    ) -> None:
        if answers is not None:
            if len(requests) != len(answers):
                raise ValueError(f"got {len(requests)} prediction lists but {len(answers)} answer lists")
            requests = [list(zip(*as_text_pairs(p, a))) for p, a in zip(requests, answers)]
        rows = []
        for pairs in requests:
            if not pairs:
                raise ValueError("a request has no sub-questions to score")
            preds, refs = as_text_pairs([p for p, _ in pairs], [a for _, a in pairs])
            scores = [rouge_recall(p, a) for p, a in zip(preds, refs)]
            rows.append({key: mean([s[key] for s in scores]) for key in ROUGE_KEYS})
        self._append(rows)
