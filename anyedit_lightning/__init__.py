"""anyedit-lightning: edit knowledge of any length and format into a language model's weights.

Implements AnyEdit (arXiv 2502.05628) on PyTorch Lightning, with MEMIT, AlphaEdit and UnKE writes.
"""

from .api import default_trainer, edit, edit_sequentially, make_writer
from .core import (
    AnyEditModule,
    Chunk,
    EditConfig,
    EditConfigError,
    EditLedger,
    EditRecord,
    EditRequest,
    FixedWindow,
    RequestError,
    Semantic,
    WriterConfigError,
    ledger_of,
    tokenize_request,
)
from .evaluation.edit_report import EditReport, edit_report  # evaluation side; the core never imports it
from .models import (
    EMBEDDED_MODEL,
    ArchitectureSpec,
    ModelLoadError,
    UnsupportedArchitectureError,
    load_model,
    register_architecture,
    resolve_architecture,
    weights_fingerprint,
)
from .patches import EditPatch, PatchFileError, apply_patches, save_edited_model
from .presets import PRESETS, Preset, get_preset
from .stats import CovarianceModule, CovarianceStats, TextCorpusDataModule, compute_covariance
from .writers import AlphaEditWrite, MemitWrite, UnkeWrite, WeightWriter

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_MODEL",
    "AlphaEditWrite",
    "AnyEditModule",
    "ArchitectureSpec",
    "Chunk",
    "CovarianceModule",
    "CovarianceStats",
    "EditConfig",
    "EditConfigError",
    "EditLedger",
    "EditPatch",
    "EditRecord",
    "EditReport",
    "EditRequest",
    "FixedWindow",
    "MemitWrite",
    "ModelLoadError",
    "PRESETS",
    "PatchFileError",
    "Preset",
    "RequestError",
    "Semantic",
    "TextCorpusDataModule",
    "UnkeWrite",
    "UnsupportedArchitectureError",
    "WeightWriter",
    "WriterConfigError",
    "apply_patches",
    "compute_covariance",
    "default_trainer",
    "edit",
    "edit_report",
    "edit_sequentially",
    "get_preset",
    "ledger_of",
    "load_model",
    "make_writer",
    "register_architecture",
    "resolve_architecture",
    "save_edited_model",
    "tokenize_request",
    "weights_fingerprint",
]
