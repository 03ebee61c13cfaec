"""Trainer set-up shared by every Lightning run on a user's model: the edit (``api.py``), the covariance
statistics (``stats/covariance.py``) and the benchmark runner (``evaluation/runner.py``).

Two things each of them needs: a Trainer placed where the model already is (the model is the user's,
often on a chosen GPU, and is not trained), and the model left on that device afterwards, since
Lightning's teardown moves the LightningModule, and so the model inside it, to the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import lightning as L
import torch

from .interrupts import call_trainer

T = TypeVar("T")


def trainer_for(
    model: torch.nn.Module, *, accelerator: str | None = None, devices: Any = None, **overrides: Any
) -> L.Trainer:
    """A ``Trainer`` on ``model``'s device, without checkpointing or a model summary.

    ``accelerator``/``devices`` default to the model's: ``"cpu"``, or its device type with its index
    (a model on ``cuda:1`` gives ``accelerator="cuda", devices=[1]``); ``None`` keeps that default, so
    callers can pass optional settings through. ``overrides`` are any other ``Trainer`` arguments
    (``logger``, ``precision``, ``strategy``, ``num_nodes``, ``callbacks``, ...) and win over the defaults.

    Example:
        >>> trainer = trainer_for(model, logger=False, precision="bf16-true")
    """
    device = next(model.parameters()).device
    settings: dict[str, Any] = dict(
        accelerator=accelerator or ("cpu" if device.type == "cpu" else device.type),
        devices=devices if devices is not None else ([device.index] if device.index is not None else 1),
        enable_checkpointing=False,  # these runs have nothing to resume
        enable_model_summary=False,  # the model is frozen: a summary would only list it
    )
    settings.update(overrides)
    return L.Trainer(**settings)


#: Warnings that Lightning itself triggers in every fit, which a user can do nothing about: Lightning 2.6
#: builds torch's deprecated ``LeafSpec`` for each dataloader (torch >= 2.10 warns, FutureWarning).
UPSTREAM_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated",)


@contextmanager
def upstream_warnings_silenced() -> Iterator[None]:
    """Hide :data:`UPSTREAM_WARNINGS` (and only those) inside the block."""
    with warnings.catch_warnings():
        for message in UPSTREAM_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield


def call_keeping_device(
    model: torch.nn.Module, entry_point: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """``entry_point(*args, **kwargs)`` (``trainer.fit``, ``trainer.test``, ``trainer.predict``, ...) with
    interrupts re-raised as ``KeyboardInterrupt`` (``call_trainer``), and ``model`` moved back to the device
    it was on before, after Lightning's teardown moved it to the CPU; also when the run fails.

    Example:
        >>> call_keeping_device(model, trainer.predict, module, datamodule=data, return_predictions=False)
    """
    device = next(model.parameters()).device
    try:
        with upstream_warnings_silenced():
            return call_trainer(entry_point, *args, **kwargs)
    finally:
        if next(model.parameters()).device != device:
            model.to(device)
