"""The EditPatch file: one safetensors file, deltas and fix-ups as tensors, metadata as JSON strings in its
header (format ``anyedit_lightning.EditPatch/1``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..core.ledger import KeyFit, LedgerEntry
from ..storage.integrity import atomic_path
from .deltas import DIRECTIONS, FixUp

FORMAT = "anyedit_lightning.EditPatch/1"


class PatchFileError(ValueError):
    """A file is not a readable EditPatch (a folder, another format, a corrupt header or tensors)."""


def param_dtype(
    deltas: Mapping[str, torch.Tensor], fixups: Mapping[str, Mapping[str, FixUp]], name: str
) -> torch.dtype:
    """The patched tensor's dtype (a fix-up holds values of it; a delta may be wider)."""
    fix = fixups.get(name, {}).get("apply")
    return fix.source.dtype if fix is not None else deltas[name].dtype


def write_patch_file(
    path: Path,
    deltas: Mapping[str, torch.Tensor],
    fixups: Mapping[str, Mapping[str, FixUp]],
    metadata: Mapping[str, Any],
    ledger: LedgerEntry | None = None,
) -> Path:
    """Write the file through a temporary one renamed at the end, so an interrupted save never leaves a
    partial patch. The ledger entry, if any, is stored as ``ledger.ids.{r}`` and ``ledger.out.{layer}.{r}``
    tensors (a closed-form write's fit adds ``ledger.keys.{r}`` and ``ledger.z.{r}``) plus a ``ledger``
    header (older readers ignore them)."""
    tensors: dict[str, torch.Tensor] = {}
    names = list(deltas)
    for i, name in enumerate(names):
        tensors[f"delta.{i}"] = deltas[name].contiguous()
        for direction, fix in fixups.get(name, {}).items():
            if len(fix):
                tensors[f"fixup.{direction}.{i}.index"] = fix.index.contiguous()
                tensors[f"fixup.{direction}.{i}.source"] = fix.source.contiguous()
                tensors[f"fixup.{direction}.{i}.target"] = fix.target.contiguous()
    dtypes = {n: str(param_dtype(deltas, fixups, n)).removeprefix("torch.") for n in names}
    if ledger is not None:
        for r, ids in enumerate(ledger.sequences):
            tensors[f"ledger.ids.{r}"] = ids.contiguous()
        for layer, outputs in ledger.outputs.items():
            for r, out in enumerate(outputs):
                tensors[f"ledger.out.{layer}.{r}"] = out.contiguous()
        layers = sorted(ledger.outputs)
        record: dict[str, Any] = {
            "requests": len(ledger.sequences),
            "layers": layers,
            "base": ledger.base,
            "result": ledger.result,
        }
        if ledger.fit is not None:
            fit = ledger.fit
            for r, (keys, targets) in enumerate(zip(fit.keys, fit.targets, strict=True)):
                tensors[f"ledger.keys.{r}"] = keys.contiguous()
                tensors[f"ledger.z.{r}"] = targets.contiguous()
            record["fit"] = {
                "method": fit.method,
                "layers": list(fit.layers),
                "z_layer": fit.z_layer,
                "preserve": fit.preserve,
            }
        metadata = {**metadata, "ledger": json.dumps(record)}
    header = {
        "format": FORMAT,
        "tensor_names": json.dumps(names),
        "param_dtypes": json.dumps(dtypes),
        **{k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in metadata.items()},
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    return path


def read_patch_file(path: Path) -> dict[str, Any]:
    """The ``EditPatch`` fields stored in ``path``; anything that is not a patch file raises
    :class:`PatchFileError` naming the path."""
    if path.is_dir():
        raise PatchFileError(f"{path} is a folder; pass the patch file itself (e.g. ada.patch.safetensors).")
    if not path.is_file():
        raise FileNotFoundError(f"No patch file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as error:  # SafetensorError and friends: a corrupt or foreign file
        raise PatchFileError(f"{path} is not a readable EditPatch file (corrupt header: {error}).") from None
    if header.get("format") != FORMAT:
        raise PatchFileError(
            f"{path} is not an EditPatch file (format {header.get('format')!r}, expected {FORMAT!r})."
        )
    try:
        return _fields(path, header)
    except Exception as error:  # truncated data, missing keys, malformed JSON in the header
        raise PatchFileError(
            f"{path} is a damaged EditPatch file ({type(error).__name__}: {error})."
        ) from None


def _fields(path: Path, header: dict[str, str]) -> dict[str, Any]:
    tensors = load_file(str(path))
    names = json.loads(header["tensor_names"])
    dtypes = json.loads(header["param_dtypes"])
    deltas, fixups = {}, {}
    for i, name in enumerate(names):
        deltas[name] = tensors[f"delta.{i}"]
        dtype = getattr(torch, dtypes[name])
        fixups[name] = {}
        for direction in DIRECTIONS:
            key = f"fixup.{direction}.{i}"
            if f"{key}.index" in tensors:
                fixups[name][direction] = FixUp(
                    tensors[f"{key}.index"], tensors[f"{key}.source"], tensors[f"{key}.target"]
                )
            else:
                empty = torch.empty(0, dtype=dtype)
                fixups[name][direction] = FixUp(torch.empty(0, dtype=torch.int32), empty, empty.clone())
    ledger = None
    if "ledger" in header:
        record = json.loads(header["ledger"])
        count = range(record["requests"])
        fit = record.get("fit")
        if fit is not None:
            fit = KeyFit(
                method=fit["method"],
                layers=tuple(fit["layers"]),
                z_layer=fit["z_layer"],
                preserve=fit["preserve"],
                keys=[tensors[f"ledger.keys.{r}"] for r in count],
                targets=[tensors[f"ledger.z.{r}"] for r in count],
            )
        ledger = LedgerEntry(
            sequences=[tensors[f"ledger.ids.{r}"] for r in count],
            outputs={n: [tensors[f"ledger.out.{n}.{r}"] for r in count] for n in record["layers"]},
            base=record["base"],
            result=record["result"],
            fit=fit,
        )
    return dict(
        ledger=ledger,
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
