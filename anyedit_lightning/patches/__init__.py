"""Edit patches: an edit saved as a small, bit-exactly revertible file of weight deltas."""

from .deltas import PatchMismatchError
from .format import PatchFileError
from .patch import EditPatch, apply_patches, load_patches, patch_path, save_edited_model

__all__ = [
    "EditPatch",
    "PatchFileError",
    "PatchMismatchError",
    "apply_patches",
    "load_patches",
    "patch_path",
    "save_edited_model",
]
