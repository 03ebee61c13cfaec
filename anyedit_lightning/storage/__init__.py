"""Shared storage helpers: cache and data folders, atomic writes and content checksums."""

from .integrity import (
    atomic_path,
    read_json_verified,
    verify_manifest,
    write_json_with_checksum,
    write_manifest,
)
from .paths import CACHE_ENV, DATA_ENV, cache_dir, default_data_dir

__all__ = [
    "CACHE_ENV",
    "DATA_ENV",
    "atomic_path",
    "cache_dir",
    "default_data_dir",
    "read_json_verified",
    "verify_manifest",
    "write_json_with_checksum",
    "write_manifest",
]
