"""Type and range checks for settings, run before any weight is touched.

A NaN slips through ``x <= 0`` (every comparison with NaN is false), so each check states what is
allowed and refuses everything else; messages name the setting and its allowed range.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


class EditConfigError(ValueError):
    """The edit's configuration does not fit the model or the requests, or a setting is out of range."""


class WriterConfigError(EditConfigError):
    """A writer setting (λ, τ, α, lr, steps, ...) has the wrong type or is out of range."""


FIRST_KEYS = ("prompt_end", "content_end", "content_word")


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int, error: type[Exception] = EditConfigError) -> None:
    if not is_int(value) or value < minimum:
        raise error(f"{name}={value!r}: must be an integer >= {minimum}.")


def check_real(
    name: str,
    value: Any,
    minimum: float = 0.0,
    inclusive: bool = False,
    error: type[Exception] = EditConfigError,
    hint: str = "",
) -> None:
    """A finite real number above ``minimum`` (or equal to it with ``inclusive``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (value == minimum and not inclusive):
        bound = ">=" if inclusive else ">"
        raise error(f"{name}={value!r}: must be a finite number {bound} {minimum}.{hint}")


def check_bool(
    name: str, value: Any, allow_none: bool = False, error: type[Exception] = EditConfigError
) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        allowed = "True, False or None" if allow_none else "True or False"
        raise error(f"{name}={value!r}: must be {allowed}.")


def check_config_fields(config: Any) -> None:
    """Every ``EditConfig`` field on its own; the model-dependent checks are in ``validation.py``."""
    layers = config.layers
    if is_int(layers):
        raise EditConfigError(
            f"layers must be a list of ints, e.g. layers=[{layers}], got layers={layers!r}."
        )
    if not isinstance(layers, (list, tuple)) or not all(is_int(layer) for layer in layers):
        raise EditConfigError(f"layers must be a list of ints, e.g. layers=[4, 5, 6], got layers={layers!r}.")
    if not layers:
        raise EditConfigError(
            "`layers` is empty: give at least one layer to edit, e.g. layers=[4, 5, 6, 7, 8]."
        )
    if config.loss_layer is not None:
        check_int("loss_layer", config.loss_layer, 0)
    if config.chunking not in ("fixed", "semantic"):
        raise EditConfigError(f"chunking={config.chunking!r}: use 'fixed' or 'semantic'.")
    if config.first_key not in FIRST_KEYS:
        raise EditConfigError(f"first_key={config.first_key!r}: use one of {FIRST_KEYS}.")
    if not is_int(config.window) or config.window < 1:
        raise EditConfigError(f"window={config.window!r}: a chunk needs at least 1 token (an integer >= 1).")
    if not is_int(config.overlap) or not 0 <= config.overlap < config.window:
        raise EditConfigError(
            f"overlap={config.overlap!r} must be an integer with 0 <= overlap < window ({config.window})."
        )
    check_int("v_steps", config.v_steps, 1)
    check_real("v_lr", config.v_lr)
    check_real("clamp", config.clamp, hint=" It bounds ‖δ‖ relative to ‖h‖.")
    check_real("v_weight_decay", config.v_weight_decay, inclusive=True)
    check_real(
        "early_stop", config.early_stop, inclusive=True, hint=" It is an NLL threshold; 0 never stops early."
    )
    for name in ("anyedit", "fast", "skip_lower_layers"):
        check_bool(name, getattr(config, name))
    check_bool("preserve_keys", config.preserve_keys, allow_none=True)
