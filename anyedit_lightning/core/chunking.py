"""Splitting a target into chunks (AnyEdit step 1, docs/algorithm.md §2).

A chunk is a half-open range ``[start, end)`` of target-token indices. Each chunk is written through
the hidden state of its key token, the token just before ``start``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Chunk:
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FixedWindow:
    """Windows of ``size`` tokens overlapping by ``overlap`` (the authors' default: 40, 0).

    ``size=None`` (or any size ≥ the target's length) gives one chunk: the single-token baselines.
    """

    size: int | None = 40
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 1:
            raise ValueError(f"window size must be at least 1 token, got {self.size}")
        if self.overlap < 0 or (self.size is not None and self.overlap >= self.size):
            raise ValueError(
                f"overlap must satisfy 0 <= overlap < window size; got overlap={self.overlap}, size={self.size}"
            )

    def __call__(
        self, target_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase | None = None
    ) -> list[Chunk]:
        total = len(target_ids)
        if self.size is None or self.size >= total:
            return [Chunk(0, total)]
        stride = self.size - self.overlap
        chunks, start = [], 0
        while start < total:
            chunks.append(Chunk(start, min(start + self.size, total)))
            if start + self.size >= total:
                break
            start += stride
        return chunks


_SENTENCE_ENDS = (".", "!", "?", ";", ":", "。", "！", "？")


@dataclass(frozen=True)
class Semantic:
    """Chunks that end at sentence or line ends, merged up to ``size`` tokens (docs/algorithm.md §2).

    A boundary follows a token that contains a newline, or that ends a sentence (``.!?;:``) when the
    next token starts with whitespace (a line break after a sentence end moves the boundary after the
    break). Sentences longer than ``size`` are split by a fixed window.
    """

    size: int = 40

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"semantic chunk budget must be at least 1 token, got {self.size}")

    def boundaries(self, target_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
        pieces = [tokenizer.decode([t]) for t in target_ids]
        ends = []
        for i, piece in enumerate(pieces[:-1]):
            nxt = pieces[i + 1]
            # a sentence end right before a line break ends after the break: no one-token "\n" chunk
            sentence_end = piece.rstrip().endswith(_SENTENCE_ENDS) and nxt[:1].isspace() and "\n" not in nxt
            if "\n" in piece or sentence_end:
                ends.append(i + 1)
        ends.append(len(target_ids))
        return ends

    def __call__(
        self, target_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase | None = None
    ) -> list[Chunk]:
        if tokenizer is None:
            raise ValueError("semantic chunking needs the tokenizer to find sentence boundaries")
        sentences, start = [], 0
        for end in self.boundaries(target_ids, tokenizer):
            while end - start > self.size:  # a sentence longer than the budget: fixed windows
                sentences.append(Chunk(start, start + self.size))
                start += self.size
            if end > start:
                sentences.append(Chunk(start, end))
            start = end
        merged: list[Chunk] = []
        for sentence in sentences:
            if merged and len(merged[-1]) + len(sentence) <= self.size:
                merged[-1] = Chunk(merged[-1].start, sentence.end)
            else:
                merged.append(sentence)
        return merged


def key_positions(prompt_len: int, chunks: Sequence[Chunk]) -> list[int]:
    """Absolute position of each chunk's key token: the token right before the chunk (docs/algorithm.md §3)."""
    return [prompt_len + chunk.start - 1 for chunk in chunks]
