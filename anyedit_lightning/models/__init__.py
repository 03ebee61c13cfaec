"""Models: loading them, where each architecture keeps its MLPs, and weight fingerprints."""

from .fingerprint import weights_fingerprint
from .loading import EMBEDDED_MODEL, ModelLoadError, load_model
from .registry import (
    ArchitectureSpec,
    ModelHandle,
    UnsupportedArchitectureError,
    register_architecture,
    resolve_architecture,
)

__all__ = [
    "EMBEDDED_MODEL",
    "ArchitectureSpec",
    "ModelHandle",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "load_model",
    "register_architecture",
    "resolve_architecture",
    "weights_fingerprint",
]
