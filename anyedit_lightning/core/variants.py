"""Question variants: the edited prompt with some words left out, answered by the same target.

A write fitted on one exact wording binds the new answer to that wording; a paraphrase whose hidden states
differ at the keys gets the old answer. Fitting the same residuals on variants of the question as well
asks the write to hold whatever the exact words (docs/algorithm.md §4.3, "question variants"). The variants
come from the prompt alone (no paraphrase is ever read), seeded by the prompt's text so a write is
reproducible.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch
from transformers import PreTrainedTokenizerBase

from .planning import RequestPlan
from .requests import tokenize_request


def dropped_words(prompt: str, count: int, drop: float) -> list[str]:
    """Up to ``count`` distinct wordings of ``prompt``, each word left out with probability ``drop``
    (at least one left out, at least two kept); fewer for prompts too short to vary.

    Capitalised words after the first (names: what the question is about) are always kept: without its
    subject a variant is another question, whose answer the edit must leave alone."""
    words = prompt.split()
    if len(words) < 3 or count < 1:
        return []
    named = torch.tensor([i > 0 and w[:1].isupper() for i, w in enumerate(words)])
    generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
    seen, variants = {prompt}, []
    for _ in range(20 * count):
        kept = (torch.rand(len(words), generator=generator) >= drop) | named
        if int(kept.sum()) < 2 or bool(kept.all()):
            continue
        text = " ".join(w for w, k in zip(words, kept.tolist()) if k)
        if text not in seen:
            seen.add(text)
            variants.append(text)
        if len(variants) == count:
            break
    return variants


def question_variants(
    tokenizer: PreTrainedTokenizerBase, plan: RequestPlan, first_key: str, count: int, drop: float
) -> list[RequestPlan]:
    """Plans of ``plan``'s request with its prompt's words dropped (:func:`dropped_words`): the same target
    tokens and chunks, keys moved with the prompt (chunk 0's to the variant's own ``first_key``).

    Raw prompts (already rendered markup) get none: leaving words out could break their markup."""
    request = plan.tokenized.request
    if request.raw_prompt:
        return []
    plans = []
    for text in dropped_words(request.prompt, count, drop):
        tokenized = tokenize_request(tokenizer, dataclasses.replace(request, prompt=text))
        plans.append(RequestPlan(tokenized, plan.chunks, first_key=tokenized.first_key(first_key)))
    return plans
