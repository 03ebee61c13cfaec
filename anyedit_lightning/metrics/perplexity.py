"""Unrelated-text perplexity: how much an edit degrades language modelling of text it never saw.

The text is the Wikipedia sample's held-out articles (``corpus.wikipedia_heldout``), which the
covariance statistics never read. The score is the ratio ``ppl(edited) / ppl(unedited)`` on the same
token batches, i.e. ``exp(mean NLL after - mean NLL before)``: exactly 1.0 for an unchanged model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from ..stats.corpus import wikipedia_heldout
from ..stats.text_data import token_batches

DEFAULT_PERPLEXITY_TOKENS = 4096
_PIECE = 32  # positions per log-softmax call


def heldout_batches(
    tokenizer, max_tokens: int = DEFAULT_PERPLEXITY_TOKENS, seq_len: int = 256, tokens_per_batch: int = 2048
) -> list[tuple[Tensor, Tensor]]:
    """The first ``max_tokens`` tokens of the held-out articles as padded ``(ids, mask)`` batches."""
    return token_batches(tokenizer, wikipedia_heldout(), max_tokens, seq_len, tokens_per_batch)


@torch.no_grad()
def total_nll(model: torch.nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (float64) and the number of predicted tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for ids, mask in batches:
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            targets = ids[:, 1:]
            # in contiguous pieces of a few MB: several times faster than one call on the whole batch,
            # which allocates (and page-faults) a second batch-sized tensor; the values are the same
            logp = torch.cat(
                [
                    torch.log_softmax(part.float(), dim=-1).gather(-1, target[:, None])[:, 0]
                    for row, row_targets in zip(logits, targets)
                    for part, target in zip(row.split(_PIECE), row_targets.split(_PIECE))
                ]
            ).view_as(targets)
            keep = (mask[:, 1:] * mask[:, :-1]).bool()
            total += float(-logp[keep].double().sum())
            count += int(keep.sum())
    finally:
        model.train(was_training)
    return total, count


class PerplexityRatio(Metric):
    """``ppl(edited) / ppl(reference)`` given the reference's mean NLL per token (NaN before any update)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, reference_nll: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reference_nll = float(reference_nll)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll_sum: float, tokens: int) -> None:
        self.nll += float(nll_sum)
        self.tokens += float(tokens)

    def compute(self) -> Tensor:
        if self.tokens <= 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.tokens.device)
        return torch.exp(self.nll / self.tokens - self.reference_nll)
