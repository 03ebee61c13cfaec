"""AnyEdit's evaluation metrics (BLEU, ROUGE recall, semantic similarity) as torchmetrics metrics.

Each reproduces the paper's scorer (NLTK ``sentence_bleu`` on raw strings, the ``rouge`` package, and
all-MiniLM-L6-v2 cosine) without depending on those packages at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .bleu import CharBLEU, WordBLEU, bleu, char_bleu, word_bleu
from .fluency import DEGENERATE_THRESHOLD, Fluency, distinct_n, is_degenerate, repetition
from .forced import ForcedItem, TopK, forced_logprobs, reference_topk
from .locality import LocalityAgreement, coarse_kl, score_locality
from .perplexity import PerplexityRatio, heldout_batches, total_nll
from .rouge import ROUGE_KEYS, RougeRecall, SubQuestionRouge, rouge_l_recall, rouge_recall
from .similarity import (
    DEFAULT_BATCH_SIZE,
    SemanticSimilarity,
    cosine_similarities,
    default_model_path,
    load_encoder,
)
from .subfacts import SubFactHits, content_words, subfact_hit
from .text import Texts, as_text_pairs, mean

__all__ = [
    "DEGENERATE_THRESHOLD",
    "CharBLEU",
    "Fluency",
    "ForcedItem",
    "LocalityAgreement",
    "PerplexityRatio",
    "RougeRecall",
    "SemanticSimilarity",
    "SubFactHits",
    "SubQuestionRouge",
    "TopK",
    "WordBLEU",
    "bleu",
    "char_bleu",
    "coarse_kl",
    "content_words",
    "cosine_similarities",
    "default_model_path",
    "distinct_n",
    "forced_logprobs",
    "heldout_batches",
    "is_degenerate",
    "load_encoder",
    "reference_topk",
    "repetition",
    "score_locality",
    "subfact_hit",
    "total_nll",
    "rouge_l_recall",
    "rouge_recall",
    "score_texts",
    "word_bleu",
]


def score_texts(
    predictions: Texts,
    references: Texts,
    similarity: bool = True,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    model_path: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """All metrics for the benchmark runner in one call.

    Returns the means (``char_bleu``, ``word_bleu``, ``rouge1``, ``rouge2``, ``rougeL`` and, when
    ``similarity``, ``similarity``) as floats, NaN for no inputs, plus ``per_item``: one dict of the
    same keys per request, in input order, for the per-request output files.
    """
    preds, refs = as_text_pairs(predictions, references)
    per_item: list[dict[str, float]] = [
        {"char_bleu": char_bleu(p, r), "word_bleu": word_bleu(p, r), **rouge_recall(p, r)}
        for p, r in zip(preds, refs)
    ]
    if similarity and preds:
        sims = cosine_similarities(preds, refs, batch_size, model_path, device).tolist()
        for row, sim in zip(per_item, sims):
            row["similarity"] = sim
    keys = ["char_bleu", "word_bleu", *ROUGE_KEYS, *(["similarity"] if similarity else [])]
    summary: dict[str, Any] = {key: mean([row[key] for row in per_item]) for key in keys}
    summary["per_item"] = per_item
    return summary
