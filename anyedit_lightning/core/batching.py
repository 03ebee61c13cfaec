"""Right-padded batches of token sequences (right padding keeps every real position where it was)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of shape ``[B, max_len]``."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, : len(seq)] = torch.as_tensor(list(seq), device=device)
            mask[row, : len(seq)] = 1
    return ids, mask
