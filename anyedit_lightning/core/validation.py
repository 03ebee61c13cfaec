"""Checks run before any weight is touched; each error says what to do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..models.registry import ModelHandle
from .checks import EditConfigError, WriterConfigError, check_config_fields
from .config import EditConfig
from .requests import EditRequest

if TYPE_CHECKING:
    from .planning import RequestPlan


__all__ = ["EditConfigError", "WriterConfigError", "validate_config", "validate_edit"]


def validate_config(handle: ModelHandle, config: EditConfig) -> None:
    check_config_fields(config)  # again: the dataclass is mutable after construction
    layers, n = list(config.layers), handle.num_layers
    out = [layer for layer in layers if not 0 <= layer < n]
    if out:
        raise EditConfigError(f"Edited layers {out} are out of range: this model has layers 0..{n - 1}.")
    if len(set(layers)) != len(layers):
        raise EditConfigError(f"Edited layers {layers} contain duplicates; list each layer once.")
    if layers != sorted(layers):
        raise EditConfigError(
            f"Edited layers {layers} must be in ascending order (the last one is the z-layer)."
        )
    if config.loss_layer is not None and not config.z_layer <= config.loss_layer < n:
        raise EditConfigError(
            f"loss_layer={config.loss_layer} must lie between the z-layer ({config.z_layer}) and {n - 1}: "
            "the loss is read above the layer where δ is added."
        )


def validate_edit(
    handle: ModelHandle,
    config: EditConfig,
    requests: Sequence[EditRequest],
    plans: Sequence[RequestPlan] | None = None,
) -> None:
    validate_config(handle, config)
    if not requests:
        raise EditConfigError("No edit requests were given.")
    for index, request in enumerate(requests):
        if not isinstance(request, EditRequest):
            raise EditConfigError(
                f"request {index} is a {type(request).__name__}; build it with EditRequest(prompt, target)."
            )
    if plans is None:
        return
    limit = getattr(handle.model.config, "max_position_embeddings", None) or getattr(
        handle.model.config, "n_positions", None
    )
    for index, plan in enumerate(plans):
        if limit and len(plan.tokenized) > limit:
            raise EditConfigError(
                f"request {index} is {len(plan.tokenized)} tokens long, more than the model's context ({limit}). "
                "Shorten the target or split it into several requests."
            )
