"""Bit-exact weight deltas (the arithmetic behind :class:`~anyedit_lightning.patches.patch.EditPatch`).

Floating-point ``before + delta`` is not always exactly ``after`` (nor ``after − delta`` exactly
``before``), so every delta comes with *fix-ups*: per direction, the flat indices where the very
arithmetic of :func:`delta_step` misses, with the exact value expected there before and the value to write.
:func:`write_deltas` applies or reverts a set of deltas all-or-nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..models.fingerprint import weights_fingerprint

Direction = Literal["apply", "revert"]
DIRECTIONS: tuple[Direction, ...] = ("apply", "revert")
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class PatchMismatchError(ValueError):
    """The patch does not belong to the model state it is applied to / reverted from."""


@dataclass
class FixUp:
    """Elements (flat ``index``) where the delta arithmetic misses: if the element holds ``source``
    (bitwise) before the step, it is set to ``target`` after it."""

    index: torch.Tensor  # [n], int32 (int64 for tensors of 2**31 elements or more)
    source: torch.Tensor  # [n], the parameter's dtype
    target: torch.Tensor  # [n], the parameter's dtype

    def __len__(self) -> int:
        return int(self.index.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.source, self.target))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern (so ``-0.0 != 0.0`` and every NaN payload counts)."""
    if tensor.is_floating_point() and tensor.element_size() in _INT_OF_SIZE:
        return tensor.view(_INT_OF_SIZE[tensor.element_size()])
    return tensor


def delta_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """Candidate delta dtypes, preferred first: float32 for half-precision tensors (their differences are
    exact there), else the tensor's own dtype; float32 tensors may fall back to float64 (see ``diff_with_fixups``)."""
    if dtype.is_floating_point and torch.finfo(dtype).bits < 32:
        return (torch.float32,)
    if dtype == torch.float32:
        return (torch.float32, torch.float64)
    return (dtype,)


def delta_step(current: torch.Tensor, delta: torch.Tensor, direction: Direction) -> torch.Tensor:
    """The arithmetic of one step, in the delta's dtype, rounded back to the parameter's dtype."""
    wide = current.detach().to(delta.dtype)
    delta = delta.to(current.device)
    out = wide + delta if direction == "apply" else wide - delta
    return out.to(current.dtype).contiguous()


def _fixup(result: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> FixUp:
    """Where ``result`` (computed from ``source``) is not bitwise ``target``."""
    miss = (bits(result) != bits(target)).reshape(-1)
    index = miss.nonzero().reshape(-1)
    index = index.to(torch.int32 if miss.numel() < 2**31 else torch.int64)
    return FixUp(
        index.cpu(),
        source.reshape(-1)[index].detach().cpu().clone(),
        target.reshape(-1)[index].detach().cpu().clone(),
    )


def diff_with_fixups(before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, dict[str, FixUp]]:
    """``after − before`` and the fix-ups of both directions, in the candidate dtype that stores smallest.

    Normally the float32 delta of a float32 tensor needs few or no fix-ups. When an update is large
    against the weights (e.g. an edit of a tiny random model) most float32 differences round, and a
    float64 delta (exact, no fix-ups) is smaller than float32 plus fix-ups, so that is kept instead.
    """
    best: tuple[int, torch.Tensor, dict[str, FixUp]] | None = None
    for dtype in delta_dtypes(after.dtype):
        delta = after.to(dtype) - before.to(dtype)
        fixups = {
            "apply": _fixup(delta_step(before, delta, "apply"), before, after),
            "revert": _fixup(delta_step(after, delta, "revert"), after, before),
        }
        size = delta.numel() * delta.element_size() + sum(f.nbytes for f in fixups.values())
        if best is None or size < best[0]:
            best = (size, delta, fixups)
        if not any(len(f) for f in fixups.values()):
            break
    return best[1], best[2]


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, each storage once (tied weights appear under their first name)."""
    tensors = dict(model.named_parameters())
    for name, buffer in model.named_buffers():
        tensors.setdefault(name, buffer)
    return tensors


class _StateView:
    """Quacks like a module for :func:`weights_fingerprint`: its ``state_dict`` with some tensors replaced."""

    def __init__(self, model: nn.Module, replacements: Mapping[str, torch.Tensor]):
        tensors = named_tensors(model)
        by_storage = {(tensors[n].data_ptr(), tuple(tensors[n].shape)): v for n, v in replacements.items()}
        self._state = {
            name: by_storage.get((value.data_ptr(), tuple(value.shape)), value)
            for name, value in model.state_dict().items()
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def fingerprint_with(model: nn.Module, replacements: Mapping[str, torch.Tensor]) -> str:
    """``weights_fingerprint`` of ``model`` as if the named tensors held ``replacements`` (nothing is written)."""
    return weights_fingerprint(_StateView(model, replacements))  # type: ignore[arg-type]


def write_deltas(
    model: nn.Module,
    deltas: Mapping[str, torch.Tensor],
    fixups: Mapping[str, Mapping[str, FixUp]],
    direction: Direction,
    expect: str | None,
) -> None:
    """Add (``apply``) or subtract (``revert``) ``deltas`` in place, then check the fingerprint is ``expect``.

    All tensors or none: any exception (or interrupt) restores the touched tensors bit-exactly.
    """
    tensors = named_tensors(model)
    snapshot = {name: tensors[name].detach().clone() for name in deltas}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                current = tensors[name]
                new = delta_step(current, delta, direction)
                fix = fixups.get(name, {}).get(direction)
                if fix is not None and len(fix):
                    index = fix.index.to(current.device, torch.long)
                    flat = new.view(-1)
                    old = current.detach().reshape(-1)[index]
                    hit = bits(old) == bits(fix.source.to(current.device))
                    flat[index[hit]] = fix.target.to(current.device)[hit]
                current.copy_(new)
        if expect is not None:
            actual = weights_fingerprint(model)
            if actual != expect:
                raise PatchMismatchError(
                    f"After {direction} the model has fingerprint {actual[:12]}, not the expected {expect[:12]}; "
                    "the weights were restored."
                )
    except BaseException:
        with torch.no_grad():
            for name, value in snapshot.items():
                tensors[name].copy_(value)
        raise
