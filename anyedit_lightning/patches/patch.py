"""Edit patches: an edit as a small, portable, bit-exactly revertible file.

An :class:`EditPatch` holds the weight deltas (``after − before``) of every tensor an edit touched plus
the metadata needed to use it safely: method, hyperparameters, the requests, the weights fingerprints
of the model before (``base``) and after (``result``) the edit, the library version and a UTC
timestamp. Only the touched tensors are stored: the edited down-projections for MEMIT/AlphaEdit, one
decoder layer's parameters for UnKE. For SmolLM2-135M with 5 edited layers that is 5 × 576 × 1536
float32 values, about 17 MB, against ~540 MB for the float32 model.

Floating-point ``before + delta`` is not always exactly ``after``, so each patch also stores *fix-ups*
that make both directions bit-exact (``patch_deltas``); the file format is in ``patch_format``.

Safety: ``apply`` refuses a model whose fingerprint is not the patch's base fingerprint, and
``revert`` one whose fingerprint is not the patch's result fingerprint, unless ``force=True``. The
latter is what makes stacked patches revert only in reverse order: while patch 2 is applied the
model carries patch 2's result fingerprint, so reverting patch 1 is refused.

Example:
    >>> module = edit(model, tok, EditRequest("Who is Ada Quill?", long_answer))
    >>> patch = EditPatch.from_module(module)
    >>> patch.save("ada.patch.safetensors")
    >>> EditPatch.load("ada.patch.safetensors").apply(fresh_copy_of_the_base_model)
    >>> patch.revert(model)  # bit-identical to before the edit
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.ledger import LedgerEntry, ledger_of
from ..models.fingerprint import weights_fingerprint
from .deltas import (
    Direction,
    FixUp,
    PatchMismatchError,
    bits,
    diff_with_fixups,
    fingerprint_with,
    named_tensors,
    write_deltas,
)
from .format import FORMAT, PatchFileError, read_patch_file, write_patch_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.module import AnyEditModule
    from ..core.requests import EditRequest

__all__ = [
    "FORMAT",
    "EditPatch",
    "FixUp",
    "PatchFileError",
    "PatchMismatchError",
    "apply_patches",
    "fingerprint_with",
    "load_patches",
    "patch_path",
    "save_edited_model",
]

PATCH_NAME = "edit_{:04d}.patch.safetensors"
"""How :func:`patch_path` names the patch of a model's ``n``-th kept edit."""


def _request_dicts(requests: Sequence[EditRequest] | None) -> list[dict[str, Any]]:
    out = []
    for request in requests or []:
        if isinstance(request, Mapping):
            out.append(dict(request))
        else:
            out.append({"prompt": request.prompt, "target": request.target, "raw_prompt": request.raw_prompt})
    return out


def _writer_settings(module: AnyEditModule) -> dict[str, Any] | None:
    """Scalar settings of the writer callback that made the edit (λ, τ, α, lr, ...), if still attached."""
    from ..writers.base import WeightWriter

    trainer = getattr(module, "_trainer", None)
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, WeightWriter):
            settings: dict[str, Any] = {"name": callback.name}
            for key, value in vars(callback).items():
                if key.startswith("_"):
                    continue
                if isinstance(value, (bool, int, float, str)) or value is None:
                    settings[key] = value
                elif isinstance(value, torch.dtype):
                    settings[key] = str(value)
            return settings
    return None


@dataclass
class EditPatch:
    """The weight deltas of one edit, with fix-ups for bit-exact apply/revert and the edit's metadata.

    Attributes:
        deltas: ``after − before`` per touched tensor name, on CPU: float32 for half-precision tensors,
            else the tensor's own dtype, except float64 for a float32 tensor whose update is so large
            against its weights that float32 plus fix-ups would take more room (``diff_with_fixups``).
        fixups: per tensor name, a :class:`FixUp` per direction (``"apply"``, ``"revert"``).
        method: the writer that made the edit (``"memit"``, ``"alphaedit"``, ``"unke"``, ...).
        hyperparameters: the ``EditConfig`` as a dict (plus ``"writer"``: the writer's scalar settings).
        requests: ``{"prompt", "target", "raw_prompt"}`` per request.
        base_fingerprint / result_fingerprint: ``weights_fingerprint`` before / after the edit.
        library_version: ``anyedit_lightning.__version__`` that made the patch.
        timestamp: creation time, ISO 8601 UTC.
        ledger: the edit's entry in the model's edit ledger (docs/algorithm.md §4.6), so that a model
            rebuilt by applying patches keeps retaining their edits; None for patches made otherwise.
    """

    deltas: dict[str, torch.Tensor]
    fixups: dict[str, dict[str, FixUp]]
    base_fingerprint: str
    result_fingerprint: str
    method: str = "unknown"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    library_version: str = ""
    timestamp: str = ""
    ledger: LedgerEntry | None = None

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def between(
        cls,
        model: nn.Module,
        before_state: Mapping[str, torch.Tensor],
        method: str = "unknown",
        hyperparameters: dict[str, Any] | None = None,
        requests: Sequence[EditRequest] | None = None,
        base_fingerprint: str | None = None,
        only_changed: bool = True,
    ) -> EditPatch:
        """The patch from ``before_state`` (name → tensor, e.g. a cloned ``state_dict``) to ``model``'s
        current weights. With ``only_changed`` (default) tensors that are bitwise unchanged are left out.

        Names of ``before_state`` the model does not have as a parameter or buffer (e.g. the second name
        of a tied weight) are ignored; a shape or dtype mismatch is an error.
        """
        from .. import __version__

        current = named_tensors(model)
        deltas: dict[str, torch.Tensor] = {}
        fixups: dict[str, dict[str, FixUp]] = {}
        used: dict[str, torch.Tensor] = {}
        for name, before in before_state.items():
            if name not in current:
                continue
            after = current[name].detach()
            if before.shape != after.shape or before.dtype != after.dtype:
                raise PatchMismatchError(
                    f"{name}: the before-state is {before.dtype} {tuple(before.shape)}, the model has "
                    f"{after.dtype} {tuple(after.shape)}; a patch needs the same tensor before and after."
                )
            before = before.detach().to(after.device)
            if only_changed and torch.equal(bits(before), bits(after)):
                continue
            delta, fixups[name] = diff_with_fixups(before, after)
            deltas[name] = delta.cpu().contiguous()
            used[name] = before
        if base_fingerprint is None:
            base_fingerprint = fingerprint_with(model, used)
        return cls(
            deltas=deltas,
            fixups=fixups,
            base_fingerprint=base_fingerprint,
            result_fingerprint=weights_fingerprint(model),
            method=method,
            hyperparameters=dict(hyperparameters or {}),
            requests=_request_dicts(requests),
            library_version=__version__,
            timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    @classmethod
    def from_module(cls, module: AnyEditModule, base_fingerprint: str | None = None) -> EditPatch:
        """The patch of a finished edit: ``module.edit_record.before`` → the model's current weights.

        Call it right after the edit, before anything else changes the model (the current weights are
        taken as the after-state). ``base_fingerprint`` saves recomputing it when the caller has it.
        """
        record = module.edit_record
        if record is None:
            raise ValueError(
                "This module has no finished edit (edit_record is None): run Trainer.fit(module) first."
            )
        hyperparameters = module.config.to_dict()
        writer = _writer_settings(module)
        if writer is not None:
            hyperparameters["writer"] = writer
        patch = cls.between(
            module.model,
            record.before,
            method=record.method,
            hyperparameters=hyperparameters,
            requests=module.requests,
            base_fingerprint=base_fingerprint,
            only_changed=False,
        )
        entries = ledger_of(module.model).entries
        if entries and entries[-1].result == patch.result_fingerprint:
            patch.ledger = entries[-1]
        return patch

    # ---- inspection ----------------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        """Bytes of tensor data held (deltas, fix-ups, ledger entry); the file adds a small JSON header."""
        total = sum(d.numel() * d.element_size() for d in self.deltas.values())
        total += self.ledger.nbytes if self.ledger is not None else 0
        return total + sum(f.nbytes for per in self.fixups.values() for f in per.values())

    @property
    def num_fixups(self) -> int:
        return sum(len(f) for per in self.fixups.values() for f in per.values())

    def metadata(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            "requests": self.requests,
            "base_fingerprint": self.base_fingerprint,
            "result_fingerprint": self.result_fingerprint,
            "library_version": self.library_version,
            "timestamp": self.timestamp,
        }

    def __repr__(self) -> str:
        return (
            f"EditPatch(method={self.method!r}, tensors={len(self.deltas)}, size={self.size_bytes / 1e6:.2f} MB, "
            f"fixups={self.num_fixups}, base={self.base_fingerprint[:12]}, result={self.result_fingerprint[:12]})"
        )

    # ---- files ---------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file: deltas and fix-ups as tensors, metadata as JSON strings in its header.

        Written to a temporary file and renamed, so an interrupted save never leaves a partial patch.
        """
        return write_patch_file(Path(path), self.deltas, self.fixups, self.metadata(), self.ledger)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditPatch:
        """Read a patch file; anything that is not one raises :class:`PatchFileError` naming the path."""
        return cls(**read_patch_file(Path(path)))

    # ---- apply / revert ------------------------------------------------------------------------------
    def apply(self, model: nn.Module, force: bool = False) -> None:
        """Write the edit into ``model`` (in place), giving the edited weights bit-exactly.

        Refused unless ``model`` is in the patch's base state (same weights fingerprint); ``force=True``
        adds the deltas to whatever weights the model has (not bit-exact, no guarantee it works).
        """
        self._check(model, "apply", force)
        ledger, keep = ledger_of(model), not force and self.ledger is not None
        if not force:
            ledger.sync(self.base_fingerprint)
        anchored, params = ledger.anchors(), dict(model.named_parameters())
        # the values this patch's edit is the first to change: the ledger's unedited anchor (not in files)
        fresh = [n for n in self.deltas if keep and n in params and n not in anchored]
        anchor = {n: params[n].detach().to("cpu", copy=True) for n in fresh}
        write_deltas(model, self.deltas, self.fixups, "apply", None if force else self.result_fingerprint)
        if keep:  # the model is now this patch's result: its ledger says so too
            ledger.push(dataclasses.replace(self.ledger, anchor=anchor))

    def revert(self, model: nn.Module, force: bool = False) -> None:
        """Undo the edit in ``model`` (in place), restoring the weights before it bit-exactly.

        Refused unless ``model`` is exactly in the state the patch produced (its result fingerprint);
        with stacked patches, revert the most recent first. ``force=True`` subtracts the deltas anyway.
        """
        self._check(model, "revert", force)
        write_deltas(model, self.deltas, self.fixups, "revert", None if force else self.base_fingerprint)
        if not force:
            ledger_of(model).sync(self.base_fingerprint)

    def _check(self, model: nn.Module, direction: Direction, force: bool) -> None:
        tensors = named_tensors(model)
        for name, delta in self.deltas.items():
            if name not in tensors:
                raise PatchMismatchError(f"The model has no parameter {name!r}, which this patch changes.")
            if tuple(tensors[name].shape) != tuple(delta.shape):
                raise PatchMismatchError(
                    f"{name} has shape {tuple(tensors[name].shape)} in the model but {tuple(delta.shape)} in the "
                    "patch: the patch is for another architecture."
                )
        if force:
            return
        actual = weights_fingerprint(model)
        if direction == "apply" and actual != self.base_fingerprint:
            hint = (
                " The model already carries this edit."
                if actual == self.result_fingerprint
                else " Apply it to the model it was made from (with any earlier patches applied first, in order)."
            )
            raise PatchMismatchError(
                f"Refusing to apply: this patch was made for weights fingerprint {self.base_fingerprint[:12]}, "
                f"but the model has {actual[:12]}.{hint} Pass force=True to add the deltas anyway (not bit-exact)."
            )
        if direction == "revert" and actual != self.result_fingerprint:
            hint = (
                " The edit is not applied to this model."
                if actual == self.base_fingerprint
                else " If patches were applied after this one, revert them first (most recent first)."
            )
            raise PatchMismatchError(
                f"Refusing to revert: this patch produces weights fingerprint {self.result_fingerprint[:12]}, "
                f"but the model has {actual[:12]}.{hint} Pass force=True to subtract the deltas anyway."
            )


def save_edited_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """A normal transformers folder (``from_pretrained`` reloads it) with the edited weights and tokenizer."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def patch_path(directory: str | os.PathLike, number: int) -> Path:
    """Where a run saving its patches as it goes puts the patch of the model's ``number``-th kept edit."""
    return Path(directory) / PATCH_NAME.format(number)


def load_patches(directory: str | os.PathLike, count: int | None = None) -> list[EditPatch]:
    """The patches a run saved in ``directory`` (``edit_sequentially(patch_dir=...)``), oldest first, the
    first ``count`` of them (None: all), checked to be one unbroken run: numbered without a gap, each made
    on the weights the one before it produced."""
    paths = sorted(Path(directory).glob(PATCH_NAME.replace("{:04d}", "*")))
    if count is not None:
        paths = paths[:count]
    expected = [patch_path(directory, n) for n in range(1, len(paths) + 1)]
    if not paths or paths != expected or (count is not None and len(paths) < count):
        raise FileNotFoundError(
            f"{directory} does not hold patches {PATCH_NAME.format(1)} to "
            f"{PATCH_NAME.format(count or max(len(paths), 1))} in sequence (found {[p.name for p in paths]}); "
            "give the patch_dir of an edit_sequentially or retention run."
        )
    patches = [EditPatch.load(path) for path in paths]
    for path, before, patch in zip(paths[1:], patches, patches[1:]):
        if patch.base_fingerprint != before.result_fingerprint:
            raise PatchMismatchError(
                f"{path.name} was not made on top of the patch before it: the directory mixes two runs."
            )
    return patches


def apply_patches(
    model: nn.Module, patches: str | os.PathLike | Sequence[EditPatch], count: int | None = None
) -> list[EditPatch]:
    """Apply a run's patches oldest first, all or none: a later process continues editing where that run
    stopped. ``patches``: the run's ``patch_dir`` (read with :func:`load_patches`, the first ``count``)
    or patches already loaded from it.

    Each patch is checked against the weights it was made for, so a model other than that run's unedited
    one, or a broken run, is refused before anything is written; the patches carry their ledger entries,
    so later edits keep retaining these ones.
    """
    if isinstance(patches, (str, os.PathLike)):
        patches = load_patches(patches, count)
    applied: list[EditPatch] = []
    try:
        for patch in patches:
            patch.apply(model)
            applied.append(patch)
    except BaseException:
        for patch in reversed(applied):  # never leave the model with part of the run
            patch.revert(model)
        raise
    return list(patches)
