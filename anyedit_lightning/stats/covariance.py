"""Second-moment statistics ``C_l = E[k kᵀ]`` of the down-projection inputs (docs/algorithm.md §5).

They are the expensive, reusable part of an edit, so they are computed once per (model weights,
layer, corpus, token count), cached on disk atomically, and computed by a ``LightningModule`` so the
corpus can be sharded over devices with any Lightning data-parallel strategy (sums and counts are
all-reduced in float64, so N processes give the matrix one would).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..core.hooks import record_inputs, run_until
from ..core.lightning_utils import call_keeping_device, trainer_for
from ..models.fingerprint import weights_fingerprint
from ..models.registry import ArchitectureSpec, ModelHandle, resolve_architecture
from ..storage.integrity import atomic_path, tensor_checksum
from ..storage.paths import cache_dir
from .corpus import WIKIPEDIA_SAMPLE
from .text_data import TextCorpusDataModule, token_batches  # noqa: F401  (token_batches: public here too)

log = logging.getLogger(__name__)


class StatsMismatchError(ValueError):
    """Statistics do not belong to the model (or device/dtype) they are used with."""


@dataclass
class CovarianceStats:
    """``C_l`` per edited layer (float64, ``m × m``) and where they came from."""

    matrices: dict[int, torch.Tensor]
    fingerprint: str
    corpus: str
    tokens: int
    counts: dict[int, int] = field(default_factory=dict)

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.matrices:
            raise KeyError(f"No statistics for layer {layer}; computed layers: {sorted(self.matrices)}")
        return self.matrices[layer]

    def check_model(self, model: torch.nn.Module, fingerprint: str | None = None) -> None:
        """Refuse statistics computed on other weights (a silent mismatch would corrupt every edit)."""
        actual = fingerprint or weights_fingerprint(model)
        if actual != self.fingerprint:
            raise StatsMismatchError(
                f"These covariance statistics were computed on a model with weights fingerprint "
                f"{self.fingerprint[:12]}, but the model being edited has {actual[:12]}. Compute statistics for "
                "this model (compute_covariance), or, for sequential editing, pass the statistics of the base "
                "model explicitly with `stats=` before the first edit."
            )


class CovarianceModule(L.LightningModule):
    """Accumulates ``Σ k kᵀ`` and token counts for several layers in one (truncated) pass per batch."""

    def __init__(
        self, model: torch.nn.Module, layers: Sequence[int], architecture: ArchitectureSpec | None = None
    ):
        super().__init__()
        self.model = model
        self.handle: ModelHandle = resolve_architecture(model, architecture)
        self.layers = sorted(set(layers))
        m = self.handle.intermediate_size
        for layer in self.layers:
            self.register_buffer(f"sum_{layer}", torch.zeros(m, m, dtype=torch.float64), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64), persistent=False)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        ids, mask = batch
        modules = {str(layer): self.handle.down_proj(layer) for layer in self.layers}
        with torch.no_grad(), record_inputs(modules, stop_after=str(self.layers[-1])) as seen:
            run_until(lambda: self.model(input_ids=ids, attention_mask=mask, use_cache=False))
        keep = mask.reshape(-1).bool()
        for layer in self.layers:
            k = seen.values[str(layer)].reshape(-1, seen.values[str(layer)].shape[-1])[keep].to(torch.float64)
            getattr(self, f"sum_{layer}").add_(k.T @ k)
        self.count.add_(keep.sum())

    def on_test_epoch_end(self) -> None:
        for layer in self.layers:
            name = f"sum_{layer}"
            setattr(self, name, self.trainer.strategy.reduce(getattr(self, name), reduce_op="sum"))
        self.count = self.trainer.strategy.reduce(self.count, reduce_op="sum")

    def result(self) -> dict[int, torch.Tensor]:
        return {layer: (getattr(self, f"sum_{layer}") / self.count).cpu() for layer in self.layers}


def _cache_path(fingerprint: str, corpus: str, tokens: int, layer: int) -> Path:
    return cache_dir("stats", fingerprint[:20]) / f"{corpus}-{tokens}-layer{layer}.safetensors"


def _load_cached(path: Path, fingerprint: str, m: int) -> tuple[torch.Tensor, int] | None:
    """A cached matrix, or None when absent, corrupt, truncated or from other weights."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            meta = json.loads(handle.read(header_len)).get("__metadata__", {})
        matrix = tensors["C"]
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        log.warning("Ignoring unreadable statistics cache %s (%s); recomputing", path, error)
        return None
    if meta.get("fingerprint") != fingerprint or matrix.shape != (m, m) or not torch.isfinite(matrix).all():
        log.warning("Ignoring statistics cache %s: it does not match this model; recomputing", path)
        return None
    if meta.get("sha256") != tensor_checksum(matrix):  # intact header, changed values: still a wrong C
        log.warning("Ignoring statistics cache %s: its checksum does not match its data; recomputing", path)
        return None
    return matrix, int(meta.get("count", 0))


def _save_cached(path: Path, matrix: torch.Tensor, fingerprint: str, count: int) -> None:
    """Write to a temporary file and rename: a killed run never leaves a half-written cache."""
    matrix = matrix.contiguous()
    meta = {"fingerprint": fingerprint, "count": str(count), "sha256": tensor_checksum(matrix)}
    with atomic_path(path) as tmp:
        save_file({"C": matrix}, tmp, metadata=meta)


def compute_covariance(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    corpus: str | Iterable[str] | object = WIKIPEDIA_SAMPLE,
    max_tokens: int = 100_000,
    seq_len: int = 256,
    tokens_per_batch: int = 4096,
    architecture: ArchitectureSpec | None = None,
    use_cache: bool = True,
    trainer: L.Trainer | None | bool = None,
) -> CovarianceStats:
    """``C_l`` for every layer in ``layers``, from the cache where possible.

    ``trainer`` decides where the work runs (e.g. ``Trainer(strategy="ddp", devices=4)``); by default a
    single-device Trainer on the model's accelerator; ``False`` runs a plain loop in this process (used
    from inside another Trainer's fit, where a nested Trainer would not be welcome).

    Example:
        >>> stats = compute_covariance(model, tokenizer, layers=[4, 5, 6, 7, 8], max_tokens=50_000)
    """
    handle = resolve_architecture(model, architecture)
    bad = [layer for layer in layers if not 0 <= layer < handle.num_layers]
    if bad:
        raise ValueError(f"Layers {bad} are out of range for a model with {handle.num_layers} layers")
    fingerprint = weights_fingerprint(model)
    data = TextCorpusDataModule(tokenizer, corpus, max_tokens, seq_len, tokens_per_batch)
    corpus_name = data.corpus_name
    m = handle.intermediate_size
    matrices, counts, missing = {}, {}, []
    for layer in sorted(set(layers)):
        cached = (
            _load_cached(_cache_path(fingerprint, corpus_name, max_tokens, layer), fingerprint, m)
            if use_cache
            else None
        )
        if cached is None:
            missing.append(layer)
        else:
            matrices[layer], counts[layer] = cached
    if missing:
        module = CovarianceModule(model, missing, architecture)
        was_training = model.training
        if trainer is False:
            device = next(model.parameters()).device
            module.to(device)
            for index, (ids, mask) in enumerate(
                tqdm(data.batches, desc="covariance statistics", leave=False)
            ):
                module.test_step((ids.to(device), mask.to(device)), index)
            is_zero = True
        else:
            trainer = trainer or trainer_for(model, logger=False, use_distributed_sampler=False)
            _check_distributed(trainer, len(data.batches))
            call_keeping_device(model, trainer.test, module, datamodule=data, verbose=False)
            is_zero = trainer.is_global_zero
        model.train(was_training)
        count = int(module.count.item())
        for layer, matrix in module.result().items():
            matrices[layer], counts[layer] = matrix, count
            if use_cache and is_zero:
                _save_cached(
                    _cache_path(fingerprint, corpus_name, max_tokens, layer), matrix, fingerprint, count
                )
    return CovarianceStats(matrices, fingerprint, corpus_name, max_tokens, counts)


def _check_distributed(trainer: L.Trainer, n_batches: int) -> None:
    """Refuse multi-process set-ups that would hang or silently return a wrong matrix.

    The batches are sharded here, in the calling process, by ``trainer.global_rank``, and the reduced
    sums are read back from this process's module. Both hold when every rank runs this code: Lightning's
    ``strategy="ddp"`` (it re-runs the script per rank) or an external launcher (torchrun, SLURM). With
    ``ddp_spawn``/``ddp_fork``/``ddp_notebook`` the workers get a pickled copy of rank 0's shard and
    their (non-persistent) sums never come back. A rank without batches would skip
    ``on_test_epoch_end`` and leave the others waiting in the all-reduce forever.
    """
    if trainer.world_size <= 1:
        return
    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is not None and not isinstance(launcher, _SubprocessScriptLauncher):
        raise ValueError(
            f"compute_covariance cannot use the {type(launcher).__name__} of strategy "
            f"{type(trainer.strategy).__name__}: its workers would not return the sums. Use strategy='ddp' "
            "(run from a script), or start the processes with torchrun/SLURM."
        )
    if n_batches < trainer.world_size:
        raise ValueError(
            f"The corpus gave {n_batches} batches for {trainer.world_size} processes; every process needs at "
            "least one. Ask for more tokens (max_tokens), use a smaller tokens_per_batch, or fewer devices."
        )
