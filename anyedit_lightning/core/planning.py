"""Request planning (docs/algorithm.md §2–§3): each request's tokens, chunks and key positions.

``plan_requests`` turns ``EditRequest``s into ``RequestPlan``s before any optimisation; the δ
optimisation (``optimize.py``) then fills each plan's ``deltas`` and ``h_init``, and the writers read
the plans' ``targets`` (``Z``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from .chunking import Chunk, FixedWindow, Semantic, key_positions
from .config import EditConfig
from .ledger import KeyTargets
from .requests import EditRequest, TokenizedRequest, tokenize_request


@dataclass
class RequestPlan:
    """One request's chunks, key positions, and (once optimised) its per-chunk targets."""

    tokenized: TokenizedRequest
    chunks: list[Chunk]
    deltas: list[torch.Tensor] = field(default_factory=list)
    h_init: list[torch.Tensor] = field(default_factory=list)
    first_key: int | None = None
    """Where the first chunk's δ goes instead of the last prompt token (``EditConfig.first_key``)."""

    @property
    def keys(self) -> list[int]:
        keys = key_positions(self.tokenized.prompt_len, self.chunks)
        if self.first_key is not None and self.chunks and self.chunks[0].start == 0:
            keys[0] = self.first_key
        return keys

    @property
    def targets(self) -> torch.Tensor:
        """``Z``: one row ``h_init + δ`` per chunk (docs/algorithm.md §3 step 5)."""
        return torch.stack([h + d for h, d in zip(self.h_init, self.deltas)])

    def keyed(self) -> KeyTargets:
        """This request as a closed-form write (and the edit ledger) sees it."""
        return KeyTargets(list(self.tokenized.ids), self.keys, self.targets)


def make_chunker(config: EditConfig) -> FixedWindow | Semantic:
    """The chunker ``config`` asks for; without AnyEdit, the whole target is one chunk."""
    if not config.anyedit:
        return FixedWindow(None)
    if config.chunking == "semantic":
        return Semantic(config.window)
    return FixedWindow(config.window, config.overlap)


def plan_requests(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], config: EditConfig
) -> list[RequestPlan]:
    """Tokenize and chunk every request; the first key moves to the user's text if ``config.first_key`` says so."""
    chunker = make_chunker(config)
    plans = []
    for request in requests:
        tokenized = tokenize_request(tokenizer, request)
        chunks = chunker(tokenized.target_ids, tokenizer)
        plans.append(RequestPlan(tokenized, chunks, first_key=tokenized.first_key(config.first_key)))
    return plans
