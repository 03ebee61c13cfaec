"""A text corpus as token batches, served by a ``LightningDataModule`` (sharded by rank under DDP).

Used by the covariance statistics (docs/algorithm.md §5). The batches are built once, in the calling
process, and each rank takes every N-th one: no sampler padding, so no token is counted twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from ..core.batching import pad_right
from .corpus import WIKIPEDIA_SAMPLE, resolve_corpus

log = logging.getLogger(__name__)

CPU = torch.device("cpu")  # batches are built once and moved by Lightning


class _PackedBatches(Dataset):
    """Pre-built token batches, so each rank can take every N-th one (no sampler padding, no double counting)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[index]


def token_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    max_tokens: int,
    seq_len: int = 256,
    tokens_per_batch: int = 4096,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Texts cut into pieces of at most ``seq_len`` tokens, grouped into padded batches by token count."""
    pieces: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len][: max_tokens - total]
            if len(piece) < 8:  # fragments add little and pad a lot
                continue
            pieces.append(piece)
            total += len(piece)
            if total >= max_tokens:
                break
        if total >= max_tokens:
            break
    if total < max_tokens:
        log.warning("The corpus gave %d tokens, fewer than the %d asked for", total, max_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches, current = [], []
    for piece in pieces:
        if current and (len(current) + 1) * max(len(piece), max(map(len, current))) > tokens_per_batch:
            batches.append(pad_right(current, pad, CPU))
            current = []
        current.append(piece)
    if current:
        batches.append(pad_right(current, pad, CPU))
    return batches


class TextCorpusDataModule(L.LightningDataModule):
    """Tokenised, length-batched pieces of a corpus (see :func:`anyedit_lightning.stats.corpus.resolve_corpus`).

    Example:
        >>> data = TextCorpusDataModule(tokenizer, "notes.txt", max_tokens=50_000)
        >>> trainer.test(CovarianceModule(model, [12]), datamodule=data)
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        corpus: str | Iterable[str] | Any = WIKIPEDIA_SAMPLE,
        max_tokens: int = 100_000,
        seq_len: int = 256,
        tokens_per_batch: int = 4096,
    ):
        super().__init__()
        if max_tokens < 1 or seq_len < 1 or tokens_per_batch < 1:
            raise ValueError("max_tokens, seq_len and tokens_per_batch must all be at least 1.")
        self.tokenizer, self.max_tokens, self.seq_len, self.tokens_per_batch = (
            tokenizer,
            max_tokens,
            seq_len,
            tokens_per_batch,
        )
        self.corpus_name, self._texts = resolve_corpus(corpus, tokenizer)
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All batches (every rank builds the same list, deterministically)."""
        if self._batches is None:
            self._batches = token_batches(
                self.tokenizer, self._texts, self.max_tokens, self.seq_len, self.tokens_per_batch
            )
        return self._batches

    def setup(self, stage: str) -> None:
        self.batches  # noqa: B018 - build them before the loaders are asked for

    def _shard(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(_PackedBatches(self.batches[rank::world]), batch_size=None, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._shard()

    def predict_dataloader(self) -> DataLoader:
        return self._shard()
