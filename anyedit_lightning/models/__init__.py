"""Models: loading them, where each architecture keeps its MLPs, per-model presets and weight fingerprints."""

from .fingerprint import weights_fingerprint
from .loading import EMBEDDED_MODEL, ModelLoadError, load_model
from .presets import PRESETS, Preset, get_preset
from .registry import (
    ArchitectureSpec,
    ModelHandle,
    UnsupportedArchitectureError,
    register_architecture,
    resolve_architecture,
)

__all__ = [
    "EMBEDDED_MODEL",
    "PRESETS",
    "ArchitectureSpec",
    "ModelHandle",
    "ModelLoadError",
    "Preset",
    "UnsupportedArchitectureError",
    "get_preset",
    "load_model",
    "register_architecture",
    "resolve_architecture",
    "weights_fingerprint",
]
