"""One call for scripts and notebooks: ``edit(model, tokenizer, requests, method=..., anyedit=...)``.

It only assembles the pieces (``AnyEditModule`` + a writer ``Callback`` + a ``Trainer``); there is no
second implementation here.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from transformers import PreTrainedTokenizerBase

from .core.checks import WriterConfigError
from .core.ledger import ledger_of, unedited_weights
from .core.lightning_utils import call_keeping_device, trainer_for
from .core.module import AnyEditModule
from .core.requests import EditRequest
from .models.fingerprint import weights_fingerprint
from .models.registry import ArchitectureSpec
from .patches.patch import EditPatch, patch_path
from .presets import get_preset
from .stats.covariance import CovarianceStats, compute_covariance
from .writers import AlphaEditWrite, MemitWrite, UnkeWrite, WeightWriter

Method = Literal["memit", "alphaedit", "unke"]
WRITERS: dict[str, type[WeightWriter]] = {"memit": MemitWrite, "alphaedit": AlphaEditWrite, "unke": UnkeWrite}


def make_writer(
    method: str, stats: CovarianceStats | None = None, stats_tokens: int = 100_000, **kwargs: Any
) -> WeightWriter:
    if method not in WRITERS:
        raise ValueError(
            f"Unknown method {method!r}; choose one of {sorted(WRITERS)} or pass writer=<a WeightWriter>."
        )
    accepted = _writer_settings(WRITERS[method])
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise WriterConfigError(
            f"The {method} writer has no setting(s) {unknown}; its settings are {sorted(accepted)}."
        )
    if method == "unke":
        return UnkeWrite(**kwargs)
    return WRITERS[method](stats=stats, stats_tokens=stats_tokens, **kwargs)


def _writer_settings(cls: type) -> set[str]:
    """Keyword names accepted by ``cls.__init__`` and the ``__init__`` of the classes it forwards to."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is WeightWriter or not issubclass(klass, WeightWriter):
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names - {"self"}


def default_trainer(
    model: torch.nn.Module, callbacks: list, log_dir: str | None = None, **kwargs: Any
) -> L.Trainer:
    """A one-epoch Trainer on the model's device, logging per chunk to CSV (TensorBoard if you pass it)."""
    defaults: dict[str, Any] = dict(
        max_epochs=1,
        logger=CSVLogger(log_dir or tempfile.mkdtemp(prefix="anyedit-logs-"), name="edit"),
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    return trainer_for(model, **{**defaults, **kwargs})


def edit(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: EditRequest | Sequence[EditRequest],
    method: Method | None = None,
    anyedit: bool = True,
    preset: str = "smollm2-135m-instruct",
    stats: CovarianceStats | None = None,
    writer: WeightWriter | None = None,
    architecture: ArchitectureSpec | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    writer_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> AnyEditModule:
    """Edit ``requests`` into ``model`` in place; returns the finished module (metrics, ``edit_record``).

    ``method=None`` takes the preset's recommended method: for the embedded SmolLM2, UnKE+AnyEdit, the
    configuration that leaves unrelated answers most intact (docs/faithful.md).

    Example:
        >>> module = edit(model, tok, EditRequest("Who is Ada Quill?", long_answer), method="memit", anyedit=True)
    """
    if isinstance(requests, EditRequest):
        requests = [requests]
    chosen = get_preset(preset)
    method = method or chosen.method
    config = chosen.config(method, anyedit, **config_overrides)
    if writer is None:
        options = {
            "stats_tokens": chosen.stats_tokens,
            **chosen.writer_kwargs(method),
            **(writer_kwargs or {}),
        }
        writer = make_writer(method, stats, **options)
    module = AnyEditModule(model, tokenizer, requests, config, architecture)
    trainer = default_trainer(model, [writer], **(trainer_kwargs or {}))
    call_keeping_device(
        model, trainer.fit, module
    )  # an interrupt arrives as KeyboardInterrupt, weights restored
    if module.edit_record is None:
        raise RuntimeError("The edit did not complete (the Trainer stopped before the write).")
    return module


_EDIT_ARGS = ("preset", "writer", "architecture", "trainer_kwargs", "writer_kwargs")


def edit_sequentially(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    method: Method | None = None,
    anyedit: bool = True,
    stats: CovarianceStats | None = None,
    callback: Callable[[int, AnyEditModule], None] | None = None,
    batch_size: int = 1,
    patch_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> list[EditPatch]:
    """Edit ``requests`` one after another into ``model`` (in place, each edit kept); one patch per edit.

    ``batch_size`` requests go into each edit (one fit, one write). Every write records its requests in
    the model's edit ledger, and UnKE's write (the default method) keeps the outputs earlier edits left
    in the layer, so edits do not overwrite each other (docs/algorithm.md §4.6); so does calling
    :func:`edit` again and again on the same model.

    MEMIT and AlphaEdit need the covariance statistics of the *unedited* model, so they are computed once,
    before the first edit (or taken from ``stats=``, which must belong to ``model`` before its kept edits), and
    reused for every edit; each write solves all kept edits again from the unedited weights. ``kwargs`` go
    to :func:`edit` (``preset``, ``trainer_kwargs``, ``writer_kwargs``, ``EditConfig`` fields, ...).
    ``callback(i, module)`` runs after edit ``i``. Patch ``i``'s base is patch ``i - 1``'s result, so
    ``for p in reversed(patches): p.revert(model)`` restores the original weights bit-exactly.

    ``patch_dir``: each patch is also saved there as soon as its edit is made, named by the model's count
    of kept edits (:func:`~anyedit_lightning.patches.patch_path`), so a long run that stops keeps its
    finished edits, and :func:`~anyedit_lightning.apply_patches` continues from them in another process.

    If edit ``i`` fails it is rolled back and the exception propagates; edits ``0..i-1`` stay in the model.
    A ``writer=`` instance is used as is for every edit.

    Example:
        >>> patches = edit_sequentially(model, tok, requests, method="memit", layers=[3, 4, 5, 6, 7])
        >>> edit_sequentially(model, tok, first_half, patch_dir="run")  # later, in another process:
        >>> apply_patches(fresh_model, "run")  # the first half back, ledger included
        >>> edit_sequentially(fresh_model, tok, second_half, patch_dir="run")
    """
    if isinstance(requests, EditRequest):
        requests = [requests]
    requests = list(requests)
    if not requests:
        raise ValueError("No edit requests were given.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: give the number of requests per edit, 1 or more.")
    writer_kwargs = dict(kwargs.pop("writer_kwargs", None) or {})
    chosen = get_preset(kwargs.get("preset", "smollm2-135m-instruct"))
    method = method or chosen.method
    covariance = method != "unke" and kwargs.get("writer") is None
    if covariance:
        overrides = {k: v for k, v in kwargs.items() if k not in _EDIT_ARGS}
        layers = chosen.config(method, anyedit, **overrides).layers
        if stats is None:
            corpus = {"corpus": writer_kwargs.get("corpus", chosen.stats_corpus(method))}
            with unedited_weights(model):
                stats = compute_covariance(
                    model,
                    tokenizer,
                    layers,
                    max_tokens=chosen.stats_tokens,
                    architecture=kwargs.get("architecture"),
                    **corpus,
                )
        missing = [layer for layer in layers if layer not in stats.matrices]
        if missing:
            raise ValueError(
                f"`stats` has no matrices for edited layers {missing}; compute them on the unedited model "
                f"first: compute_covariance(model, tokenizer, {list(layers)})."
            )
    patches: list[EditPatch] = []
    fingerprint = weights_fingerprint(model)
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    for i, batch in enumerate(batches):
        module = edit(
            model,
            tokenizer,
            batch,
            method=method,
            anyedit=anyedit,
            stats=stats,
            writer_kwargs=writer_kwargs,
            **kwargs,
        )
        patch = EditPatch.from_module(module, base_fingerprint=fingerprint)
        fingerprint = patch.result_fingerprint
        patches.append(patch)
        if patch_dir is not None:  # the save makes the folder
            patch.save(patch_path(patch_dir, len(ledger_of(model))))
        if callback is not None:
            callback(i, module)
    return patches
