"""Teacher-forced passes: the model's next-token log-probabilities along given answers, batch by batch.

Locality and neighbourhood compare an edited model with the unedited one on the unedited model's own
answers. Both passes must see identical batches (same items, same order, same padding) so that an
unchanged model gives bit-identical log-probabilities: items are cut into fixed batches in input order
and right-padded, which leaves every real position's computation independent of the padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

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


@torch.no_grad()
def forced_logprobs(
    model: torch.nn.Module, items: Sequence[ForcedItem], batch_size: int = FORCED_BATCH_SIZE
) -> Iterator[tuple[int, Tensor]]:
    """``(item index, log-probs [len(answer_ids), vocab])`` for every item with an answer, in input order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            group = [(i, items[i]) for i in range(start, min(start + batch_size, len(items)))]
            group = [(i, it) for i, it in group if it.answer_ids]
            if not group:
                continue
            seqs = [list(it.prompt_ids) + list(it.answer_ids[:-1]) for _, it in group]
            width = max(map(len, seqs))
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for row, (i, item) in enumerate(group):
                first = len(item.prompt_ids) - 1
                rows = logits[row, first : first + len(item.answer_ids)].float()
                yield i, torch.log_softmax(rows, dim=-1)
    finally:
        model.train(was_training)


def reference_topk(
    model: torch.nn.Module,
    items: Sequence[ForcedItem],
    k: int = DEFAULT_TOP_K,
    batch_size: int = FORCED_BATCH_SIZE,
) -> list[TopK | None]:
    """The model's top-``k`` next-token distributions along each item's answer (None: no answer tokens)."""
    out: list[TopK | None] = [None] * len(items)
    for i, logp in forced_logprobs(model, items, batch_size):
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        out[i] = TopK(ids.cpu(), values.cpu())
    return out
