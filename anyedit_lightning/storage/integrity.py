"""Content checksums for cached artefacts, written with them and verified on load.

A cache whose bytes changed after it was written (a flipped bit, a partial copy, an edit by hand) can
still parse and hold finite values, and would then be used silently. Every cache therefore stores a
SHA-256 of its content; a reader that finds a mismatch warns and rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MANIFEST = "checksums.json"


def checksum(data: bytes | str) -> str:
    """SHA-256 (hex) of bytes, or of a string's UTF-8 encoding."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def tensor_checksum(tensors: torch.Tensor | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes (so equal values in another dtype differ)."""
    items = tensors.items() if isinstance(tensors, Mapping) else [("", tensors)]
    digest = hashlib.sha256()
    for name, tensor in sorted(items, key=lambda item: item[0]):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_checksum(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file next to ``path`` to write to, renamed onto ``path`` when the block ends without
    an error and removed otherwise, so a killed run never leaves a half-written file (or cache).

    Example:
        >>> with atomic_path(folder / "C.safetensors") as tmp:
        ...     save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would give, not mkstemp's private 0o600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux's ``/proc``): setting it
    to read it would leave other threads' new files world-writable for that moment."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # the fallback's brief window is private, never permissive
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def finite_json(value: Any) -> Any:
    """``value`` with NaN/inf floats (at any depth of mappings and lists) replaced by None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _canonical(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def write_json_with_checksum(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``{"sha256": ..., "data": payload}`` atomically (temporary file, then rename)."""
    path = Path(path)
    text = json.dumps({"sha256": checksum(_canonical(payload)), "data": payload}, ensure_ascii=False)
    atomic_write_text(path, text)
    return path


def read_json_verified(path: str | os.PathLike) -> Any | None:
    """The payload written by :func:`write_json_with_checksum`; None (with a warning) when the file is
    missing, unreadable or its checksum does not match, so the caller rebuilds it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        wrapper = json.loads(path.read_text(encoding="utf-8"))
        payload, expected = wrapper["data"], wrapper["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("Ignoring unreadable cache %s (%s); rebuilding it", path, error)
        return None
    if checksum(_canonical(payload)) != expected:
        log.warning("Ignoring cache %s: its checksum does not match its content; rebuilding it", path)
        return None
    return payload


def write_manifest(folder: str | os.PathLike, names: Iterable[str] | None = None) -> Path:
    """Record the checksum of every file in ``folder`` (or of ``names``) in ``folder/checksums.json``."""
    folder = Path(folder)
    if names is None:
        names = [p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST]
    sums = {name: file_checksum(folder / name) for name in sorted(names)}
    return write_json_with_checksum(folder / MANIFEST, sums)


def verify_manifest(folder: str | os.PathLike) -> bool:
    """True when ``folder`` has a manifest and every file it lists exists with the recorded checksum."""
    folder = Path(folder)
    sums = read_json_verified(folder / MANIFEST)
    if not isinstance(sums, dict) or not sums:
        return False
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file() or file_checksum(path) != expected:
            log.warning("Cached file %s is missing or its checksum does not match", path)
            return False
    return True
