"""Copies of named tensors taken before a change and put back after it, bit for bit.

Every place that changes a user's weights and may have to undo it (an atomic write, a benchmark that
restores the model between edits) takes the same two steps; they live here so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch


def snapshot(
    tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Detached copies of ``tensors[name]`` for ``names`` (default: all), on their own devices.

    Example:
        >>> saved = snapshot(dict(model.named_parameters()), ["model.layers.4.mlp.down_proj.weight"])
    """
    return {name: tensors[name].detach().clone() for name in (tensors if names is None else names)}


def restore(tensors: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> None:
    """Copy each ``saved[name]`` back into ``tensors[name]`` in place (no autograd record)."""
    with torch.no_grad():
        for name, value in saved.items():
            tensors[name].copy_(value)


@contextmanager
def weights_swapped(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Load ``tensors`` (parameter name -> value) into ``model`` inside the block; restore exactly after."""
    params = dict(model.named_parameters())
    saved = snapshot(params, tensors)
    try:
        restore(params, tensors)
        yield
    finally:
        restore(params, saved)
