"""The edit ledger: what each kept edit made the edited layers produce, so later writes keep it
(docs/algorithm.md §4.6).

Two edits written into the same layer overwrite each other: the second write fits its own text and
generic text, never the first edit's. An entry records one write's token sequences and, per written
layer, that layer's outputs on them right after the write; writers that retain (UnKE by default) fit
those outputs again next to their own targets.

The ledger lives on the model object (:func:`ledger_of`), so calling ``edit`` again and again on the same
model retains earlier edits without any bookkeeping by the caller; patches carry their entry, so a saved
chain of patches continues in another process. Each entry holds the weights fingerprints before and
after its write, and :meth:`EditLedger.sync` cuts the ledger back to the model's current weights before
use: a reverted edit (a patch revert, a restored snapshot) leaves the model at its entry's base, and the
entries from there on no longer describe it.

Closed-form writes (MEMIT, AlphaEdit) also record what they solved for (:class:`KeyFit`: each request's
key positions and targets ``Z``), so a later write of the same kind solves all kept edits again, jointly,
from the unedited weights: the batch write of every kept edit (docs/algorithm.md §4.6).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.fingerprint import weights_fingerprint
from .weights import restore, weights_swapped

log = logging.getLogger(__name__)

ATTRIBUTE = "_anyedit_ledger"


@dataclass
class KeyTargets:
    """One request as a closed-form write sees it: token ids, key positions, and a target row per key."""

    ids: list[int]
    keys: list[int]
    targets: torch.Tensor  # [len(keys), hidden]


@dataclass
class KeyFit:
    """What a closed-form write solved for: per request the key positions and targets ``Z`` (float32,
    on CPU) at ``z_layer``, and the settings a joint re-solve must share with it."""

    method: str
    layers: tuple[int, ...]
    z_layer: int
    preserve: bool
    keys: list[torch.Tensor]
    targets: list[torch.Tensor]

    def solves_like(self, other: KeyFit) -> bool:
        """Whether one joint solve can hold both writes (same method, layers, z-layer, preserved keys)."""
        mine = (self.method, tuple(self.layers), self.z_layer, self.preserve)
        return mine == (other.method, tuple(other.layers), other.z_layer, other.preserve)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.targets))


@dataclass
class LedgerEntry:
    """One write: per request its token ids, and per written layer the layer's outputs on them after it.

    Attributes:
        sequences: token ids per request, 1-D ``int64`` on CPU.
        outputs: ``layer -> [outputs of request r, shape (len(sequences[r]), hidden)]``, float32 on CPU.
        base / result: weights fingerprints of the model before and after the write.
        anchor: the values before this write of the parameters it was the first kept edit to touch, on
            CPU; together the entries' anchors are the unedited values of every edited parameter. Taken
            from the model when an entry is recorded or a patch applied, so patch files do not store it.
        fit: for closed-form writes, the keys and targets solved for; ``None`` for others (UnKE).
    """

    sequences: list[torch.Tensor]
    outputs: dict[int, list[torch.Tensor]]
    base: str
    result: str
    anchor: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    fit: KeyFit | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the recorded sequences, outputs and fit (what a patch file stores; not the anchor)."""
        held = [*self.sequences, *(o for per in self.outputs.values() for o in per)]
        fit = self.fit.nbytes if self.fit is not None else 0
        return sum(t.numel() * t.element_size() for t in held) + fit

    def keyed(self) -> list[KeyTargets]:
        """The fitted requests, for a joint re-solve (empty without a fit)."""
        if self.fit is None:
            return []
        return [
            KeyTargets(ids.tolist(), keys.tolist(), targets)
            for ids, keys, targets in zip(self.sequences, self.fit.keys, self.fit.targets, strict=True)
        ]


class EditLedger:
    """The entries of the edits a model carries, oldest first."""

    def __init__(self, entries: list[LedgerEntry] | None = None):
        self.entries: list[LedgerEntry] = list(entries or [])

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        size = sum(e.nbytes for e in self.entries) / 1e6
        return f"EditLedger(entries={len(self)}, size={size:.1f} MB)"

    def sync(self, fingerprint: str) -> None:
        """Keep only the entries that led to weights ``fingerprint``.

        The model is either at an entry's result (keep up to it) or at an entry's base (an edit and
        everything after it was reverted: keep the entries before it). Anything else means the weights
        were changed outside the library, and the recorded outputs no longer belong to this model: the
        ledger is emptied, with a warning.
        """
        for i in range(len(self.entries) - 1, -1, -1):
            if self.entries[i].result == fingerprint:
                del self.entries[i + 1 :]
                return
            if self.entries[i].base == fingerprint:
                del self.entries[i:]
                return
        if self.entries:
            log.warning(
                "The model's weights match none of the %d edits in its ledger (changed outside anyedit?); "
                "later edits will not retain them.",
                len(self.entries),
            )
            self.entries.clear()

    def push(self, entry: LedgerEntry) -> None:
        if self.entries and self.entries[-1].result != entry.base:
            raise ValueError(
                "A ledger entry must start from the last entry's result; call sync(fingerprint) first."
            )
        self.entries.append(entry)

    def pop(self, result: str) -> LedgerEntry | None:
        """Remove and return the last entry if it produced ``result`` (an edit being reverted)."""
        if self.entries and self.entries[-1].result == result:
            return self.entries.pop()
        return None

    def anchors(self) -> dict[str, torch.Tensor]:
        """The unedited values of every parameter the kept edits changed (each from its first edit)."""
        merged: dict[str, torch.Tensor] = {}
        for entry in self.entries:
            for name, value in entry.anchor.items():
                merged.setdefault(name, value)
        return merged

    def at_layers(self, layers: Iterable[int]) -> list[LedgerEntry]:
        """The entries whose write touched any of ``layers``, oldest first."""
        wanted = set(layers)
        return [entry for entry in self.entries if wanted & set(entry.outputs)]

    def at_layer(self, layer: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(ids, outputs)`` of every recorded request whose write touched ``layer``, oldest first."""
        for entry in self.entries:
            yield from zip(entry.sequences, entry.outputs.get(layer, []))


def ledger_of(model: nn.Module) -> EditLedger:
    """The ledger kept on ``model`` (created empty the first time)."""
    ledger = model.__dict__.get(ATTRIBUTE)
    if ledger is None:
        ledger = EditLedger()
        model.__dict__[ATTRIBUTE] = ledger  # a plain attribute: not a submodule, not in the state dict
    return ledger


def synced_ledger(model: nn.Module) -> EditLedger:
    """``model``'s ledger cut back to its current weights (hashes the weights only if it has entries)."""
    ledger = ledger_of(model)
    if len(ledger):
        ledger.sync(weights_fingerprint(model))
    return ledger


@contextmanager
def unedited_weights(model: nn.Module) -> Iterator[EditLedger]:
    """Inside the block, every parameter the model's kept edits changed is back at its unedited value
    (the ledger's anchors), e.g. to compute the unedited model's statistics; restored exactly after."""
    ledger = synced_ledger(model)
    with weights_swapped(model, ledger.anchors()):
        yield ledger


def reset_to_anchors(model: nn.Module, names: Iterable[str]) -> None:
    """Put each of ``names`` that a kept edit changed back at its unedited value (the ledger's anchor),
    for a write that fits the kept edits again from there."""
    anchors = ledger_of(model).anchors()
    restore(dict(model.named_parameters()), {n: anchors[n] for n in names if n in anchors})
