"""Edit patches: an edit as a small, portable, bit-exactly revertible file.

An :class:`EditPatch` holds the weight deltas (``after − before``) of every tensor an edit touched plus
the metadata needed to use it safely: method, hyperparameters, the requests, the weights fingerprints
of the model before (``base``) and after (``result``) the edit, the library version and a UTC
timestamp. Only the touched tensors are stored: the edited down-projections for MEMIT/AlphaEdit, one
decoder layer's parameters for UnKE. For SmolLM2-135M with 5 edited layers that is 5 × 576 × 1536
float32 values, about 17 MB, against ~540 MB for the float32 model.

Floating-point ``before + delta`` is not always exactly ``after`` (nor ``after − delta`` exactly
``before``), so each patch also stores *fix-ups*: for every tensor and direction, the flat indices of
the elements where the arithmetic misses, with the exact value expected there before and the exact
value to write. They are found when the patch is made, by running the very arithmetic ``apply`` and
``revert`` use and comparing bit patterns, so both directions are bit-exact. Normally there are few or
none; when an update is large against the weights (tiny random test models), a float32 tensor's delta
is kept in float64 instead, which needs none, whenever that is smaller.

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

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .fingerprint import weights_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .module import AnyEditModule
    from .requests import EditRequest

FORMAT = "anyedit_lightning.EditPatch/1"
Direction = Literal["apply", "revert"]
_DIRECTIONS: tuple[Direction, ...] = ("apply", "revert")
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class PatchMismatchError(ValueError):
    """The patch does not belong to the model state it is applied to / reverted from."""


class PatchFileError(ValueError):
    """A file is not a readable EditPatch (a folder, another format, a corrupt header or tensors)."""


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


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern (so ``-0.0 != 0.0`` and every NaN payload counts)."""
    if tensor.is_floating_point() and tensor.element_size() in _INT_OF_SIZE:
        return tensor.view(_INT_OF_SIZE[tensor.element_size()])
    return tensor


def _delta_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """Candidate delta dtypes, preferred first: float32 for half-precision tensors (their differences are
    exact there), else the tensor's own dtype; float32 tensors may fall back to float64 (see ``_diff``)."""
    if dtype.is_floating_point and torch.finfo(dtype).bits < 32:
        return (torch.float32,)
    if dtype == torch.float32:
        return (torch.float32, torch.float64)
    return (dtype,)


def _step(current: torch.Tensor, delta: torch.Tensor, direction: Direction) -> torch.Tensor:
    """The arithmetic of one step, in the delta's dtype, rounded back to the parameter's dtype."""
    wide = current.detach().to(delta.dtype)
    delta = delta.to(current.device)
    out = wide + delta if direction == "apply" else wide - delta
    return out.to(current.dtype).contiguous()


def _fixup(result: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> FixUp:
    """Where ``result`` (computed from ``source``) is not bitwise ``target``."""
    miss = (_bits(result) != _bits(target)).reshape(-1)
    index = miss.nonzero().reshape(-1)
    index = index.to(torch.int32 if miss.numel() < 2**31 else torch.int64)
    return FixUp(
        index.cpu(),
        source.reshape(-1)[index].detach().cpu().clone(),
        target.reshape(-1)[index].detach().cpu().clone(),
    )


def _diff(before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, dict[str, FixUp]]:
    """``after − before`` and the fix-ups of both directions, in the candidate dtype that stores smallest.

    Normally the float32 delta of a float32 tensor needs few or no fix-ups. When an update is large
    against the weights (e.g. an edit of a tiny random model) most float32 differences round, and a
    float64 delta (exact, no fix-ups) is smaller than float32 plus fix-ups, so that is kept instead.
    """
    best: tuple[int, torch.Tensor, dict[str, FixUp]] | None = None
    for dtype in _delta_dtypes(after.dtype):
        delta = after.to(dtype) - before.to(dtype)
        fixups = {
            "apply": _fixup(_step(before, delta, "apply"), before, after),
            "revert": _fixup(_step(after, delta, "revert"), after, before),
        }
        size = delta.numel() * delta.element_size() + sum(f.nbytes for f in fixups.values())
        if best is None or size < best[0]:
            best = (size, delta, fixups)
        if not any(len(f) for f in fixups.values()):
            break
    return best[1], best[2]


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, each storage once (tied weights appear under their first name)."""
    tensors = dict(model.named_parameters())
    for name, buffer in model.named_buffers():
        tensors.setdefault(name, buffer)
    return tensors


class _StateView:
    """Quacks like a module for :func:`weights_fingerprint`: its ``state_dict`` with some tensors replaced."""

    def __init__(self, model: nn.Module, replacements: Mapping[str, torch.Tensor]):
        tensors = _named_tensors(model)
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
    from .writers.base import WeightWriter

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
            against its weights that float32 plus fix-ups would take more room (see ``_diff``).
        fixups: per tensor name, a :class:`FixUp` per direction (``"apply"``, ``"revert"``).
        method: the writer that made the edit (``"memit"``, ``"alphaedit"``, ``"unke"``, ...).
        hyperparameters: the ``EditConfig`` as a dict (plus ``"writer"``: the writer's scalar settings).
        requests: ``{"prompt", "target", "raw_prompt"}`` per request.
        base_fingerprint / result_fingerprint: ``weights_fingerprint`` before / after the edit.
        library_version: ``anyedit_lightning.__version__`` that made the patch.
        timestamp: creation time, ISO 8601 UTC.
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
        from . import __version__

        current = _named_tensors(model)
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
            if only_changed and torch.equal(_bits(before), _bits(after)):
                continue
            delta, fixups[name] = _diff(before, after)
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
        return cls.between(
            module.model,
            record.before,
            method=record.method,
            hyperparameters=hyperparameters,
            requests=module.requests,
            base_fingerprint=base_fingerprint,
            only_changed=False,
        )

    # ---- inspection ----------------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        """Bytes of tensor data held (deltas and fix-ups); the file adds a small JSON header."""
        total = sum(d.numel() * d.element_size() for d in self.deltas.values())
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
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        names = list(self.deltas)
        for i, name in enumerate(names):
            tensors[f"delta.{i}"] = self.deltas[name].contiguous()
            for direction, fix in self.fixups.get(name, {}).items():
                if len(fix):
                    tensors[f"fixup.{direction}.{i}.index"] = fix.index.contiguous()
                    tensors[f"fixup.{direction}.{i}.source"] = fix.source.contiguous()
                    tensors[f"fixup.{direction}.{i}.target"] = fix.target.contiguous()
        meta = self.metadata()
        header = {
            "format": FORMAT,
            "tensor_names": json.dumps(names),
            "param_dtypes": json.dumps({n: str(self._param_dtype(n)).removeprefix("torch.") for n in names}),
            **{k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in meta.items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=header)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditPatch:
        """Read a patch file; anything that is not one raises :class:`PatchFileError` naming the path."""
        path = Path(path)
        if path.is_dir():
            raise PatchFileError(
                f"{path} is a folder; pass the patch file itself (e.g. ada.patch.safetensors)."
            )
        if not path.is_file():
            raise FileNotFoundError(f"No patch file at {path}.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
        except Exception as error:  # SafetensorError and friends: a corrupt or foreign file
            raise PatchFileError(
                f"{path} is not a readable EditPatch file (corrupt header: {error})."
            ) from None
        if header.get("format") != FORMAT:
            raise PatchFileError(
                f"{path} is not an EditPatch file (format {header.get('format')!r}, expected {FORMAT!r})."
            )
        try:
            return cls._from_file(path, header)
        except Exception as error:  # truncated data, missing keys, malformed JSON in the header
            raise PatchFileError(
                f"{path} is a damaged EditPatch file ({type(error).__name__}: {error})."
            ) from None

    @classmethod
    def _from_file(cls, path: Path, header: dict[str, str]) -> EditPatch:
        tensors = load_file(str(path))
        names = json.loads(header["tensor_names"])
        dtypes = json.loads(header["param_dtypes"])
        deltas, fixups = {}, {}
        for i, name in enumerate(names):
            deltas[name] = tensors[f"delta.{i}"]
            dtype = getattr(torch, dtypes[name])
            fixups[name] = {}
            for direction in _DIRECTIONS:
                key = f"fixup.{direction}.{i}"
                if f"{key}.index" in tensors:
                    fixups[name][direction] = FixUp(
                        tensors[f"{key}.index"], tensors[f"{key}.source"], tensors[f"{key}.target"]
                    )
                else:
                    empty = torch.empty(0, dtype=dtype)
                    fixups[name][direction] = FixUp(torch.empty(0, dtype=torch.int32), empty, empty.clone())
        return cls(
            deltas=deltas,
            fixups=fixups,
            base_fingerprint=header["base_fingerprint"],
            result_fingerprint=header["result_fingerprint"],
            method=header.get("method", "unknown"),
            hyperparameters=json.loads(header.get("hyperparameters", "{}")),
            requests=json.loads(header.get("requests", "[]")),
            library_version=header.get("library_version", ""),
            timestamp=header.get("timestamp", ""),
        )

    def _param_dtype(self, name: str) -> torch.dtype:
        fix = self.fixups.get(name, {}).get("apply")
        return fix.source.dtype if fix is not None else self.deltas[name].dtype

    # ---- apply / revert ------------------------------------------------------------------------------
    def apply(self, model: nn.Module, force: bool = False) -> None:
        """Write the edit into ``model`` (in place), giving the edited weights bit-exactly.

        Refused unless ``model`` is in the patch's base state (same weights fingerprint); ``force=True``
        adds the deltas to whatever weights the model has (not bit-exact, no guarantee it works).
        """
        self._check(model, "apply", force)
        self._write(model, "apply", expect=None if force else self.result_fingerprint)

    def revert(self, model: nn.Module, force: bool = False) -> None:
        """Undo the edit in ``model`` (in place), restoring the weights before it bit-exactly.

        Refused unless ``model`` is exactly in the state the patch produced (its result fingerprint);
        with stacked patches, revert the most recent first. ``force=True`` subtracts the deltas anyway.
        """
        self._check(model, "revert", force)
        self._write(model, "revert", expect=None if force else self.base_fingerprint)

    def _check(self, model: nn.Module, direction: Direction, force: bool) -> None:
        tensors = _named_tensors(model)
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

    def _write(self, model: nn.Module, direction: Direction, expect: str | None) -> None:
        """All tensors or none: any exception (or interrupt) restores the touched tensors bit-exactly."""
        tensors = _named_tensors(model)
        snapshot = {name: tensors[name].detach().clone() for name in self.deltas}
        try:
            with torch.no_grad():
                for name, delta in self.deltas.items():
                    current = tensors[name]
                    new = _step(current, delta, direction)
                    fix = self.fixups.get(name, {}).get(direction)
                    if fix is not None and len(fix):
                        index = fix.index.to(current.device, torch.long)
                        flat = new.view(-1)
                        old = current.detach().reshape(-1)[index]
                        hit = _bits(old) == _bits(fix.source.to(current.device))
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


def save_edited_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """A normal transformers folder (``from_pretrained`` reloads it) with the edited weights and tokenizer."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
