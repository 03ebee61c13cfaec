"""The editing core: requests, chunking, per-chunk residual optimisation and the Lightning edit module."""

from .checks import EditConfigError, WriterConfigError
from .chunking import Chunk, FixedWindow, Semantic
from .config import EditConfig
from .ledger import EditLedger, LedgerEntry, ledger_of
from .module import AnyEditModule, EditRecord
from .optimize import DeltaOptimizer, NonFiniteError
from .planning import RequestPlan, plan_requests
from .requests import EditRequest, RequestError, TokenizedRequest, tokenize_request

__all__ = [
    "AnyEditModule",
    "Chunk",
    "DeltaOptimizer",
    "EditConfig",
    "EditConfigError",
    "EditLedger",
    "EditRecord",
    "EditRequest",
    "FixedWindow",
    "LedgerEntry",
    "NonFiniteError",
    "RequestError",
    "RequestPlan",
    "Semantic",
    "TokenizedRequest",
    "WriterConfigError",
    "ledger_of",
    "plan_requests",
    "tokenize_request",
]
