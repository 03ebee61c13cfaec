"""Teacher-forced passes: the model's next-token log-probabilities along given answers, batch by batch.

Locality and neighbourhood compare an edited model with the unedited one on the unedited model's own
answers. Both passes must see identical batches (same items, same order, same padding) so that an
unchanged model gives bit-identical log-probabilities: items are cut into fixed batches in input order
and right-padded, which leaves every real position's computation independent of the padding.

Rendered prompts start with the same chat-template tokens (SmolLM2: its system prompt, about 40 % of an
item). Given a :class:`SharedPrefix`, a batch whose items all start with it runs only what follows,
continuing from a copy of the prefix's key/value cache.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.batching import pad_right

DEFAULT_TOP_K = 256
FORCED_BATCH_SIZE = 16


@dataclass(frozen=True)
class ForcedItem:
    """A rendered prompt's ids and the answer ids to score (position ``t`` predicts ``answer_ids[t]``)."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


@dataclass(frozen=True)
class TopK:
    """A reference distribution kept as its ``k`` most likely tokens per answer position (``[T, k]``).

    Keeping only the top of the vocabulary makes the unedited reference cheap to hold for a whole run.
    """

    ids: Tensor
    logp: Tensor


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x calls the KV cache ``cache``; 4.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class SharedPrefix:
    """Token ids that items start with and the model's key/value cache for them (a batch of one)."""

    ids: tuple[int, ...]
    cache: Any


@torch.no_grad()
def shared_prefix(model: torch.nn.Module, ids: Sequence[int]) -> SharedPrefix | None:
    """Run ``ids`` once on the model as it is now (None: no ids, or a cache that cannot be batched)."""
    if not ids:
        return None
    device = next(model.parameters()).device
    extra = {"logits_to_keep": 1} if _keeps_logits(model) else {}
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, **extra)
    finally:
        model.train(was_training)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    return SharedPrefix(tuple(ids), cache)


@torch.no_grad()
def forced_logprobs(
    model: torch.nn.Module,
    items: Sequence[ForcedItem],
    batch_size: int = FORCED_BATCH_SIZE,
    prefix: SharedPrefix | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """``(item index, log-probs [len(answer_ids), vocab])`` for every item with an answer, in input order.

    ``prefix``: computed on the model as it is now; used by the batches whose prompts all extend it.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            group = [(i, items[i]) for i in range(start, min(start + batch_size, len(items)))]
            group = [(i, it) for i, it in group if it.answer_ids]
            if not group:
                continue
            n = len(prefix.ids) if prefix is not None else 0
            if n and not all(len(it.prompt_ids) > n and it.prompt_ids[:n] == prefix.ids for _, it in group):
                n = 0
            seqs = [list(it.prompt_ids[n:]) + list(it.answer_ids[:-1]) for _, it in group]
            ids, mask = pad_right(seqs, 0, torch.device("cpu"))
            width = ids.shape[1]
            # no logits over the prompt positions that precede every answer in the batch
            keep = width - min(len(it.prompt_ids) - n for _, it in group) + 1
            extra = {"logits_to_keep": keep} if _keeps_logits(model) else {}
            if n:
                cache = copy.deepcopy(prefix.cache)
                cache.batch_repeat_interleave(len(seqs))
                extra[_cache_kwarg(model)] = cache
                mask = torch.cat([torch.ones((len(seqs), n), dtype=torch.long), mask], dim=1)
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **extra
            ).logits
            for row, (i, item) in enumerate(group):
                first = len(item.prompt_ids) - n - 1 - (width - logits.shape[1])
                rows = logits[row, first : first + len(item.answer_ids)].float()
                yield i, torch.log_softmax(rows, dim=-1)
    finally:
        model.train(was_training)


def reference_topk(
    model: torch.nn.Module,
    items: Sequence[ForcedItem],
    k: int = DEFAULT_TOP_K,
    batch_size: int = FORCED_BATCH_SIZE,
    prefix: SharedPrefix | None = None,
) -> list[TopK | None]:
    """The model's top-``k`` next-token distributions along each item's answer (None: no answer tokens)."""
    out: list[TopK | None] = [None] * len(items)
    for i, logp in forced_logprobs(model, items, batch_size, prefix):
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        out[i] = TopK(ids.cpu(), values.cpu())
    return out
