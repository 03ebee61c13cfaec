"""The model's own forward pass with δs added to the z-layer output (docs/algorithm.md §3 step 2).

Every forward of the δ optimisation goes through :class:`ResidualForward`: the reference path's full
passes, the fast path's prefix passes (which fill a key/value cache) and its per-step window passes
(which may replay the z-layer's fixed states instead of running layers ``0..z``, docs/algorithm.md §3.1).
What a pass observed (the unperturbed states, the z-layer's output and its structure) comes back in a
:class:`ForwardResult`, not through state left on an object.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models.registry import ModelHandle
from .hooks import edit_layer_output

LAYER_ATTRIBUTES = ("attention_type", "layer_idx", "is_sliding")
"""What the model's forward reads off its decoder layers (mask type, cache slot), so a stand-in has them too."""


def copy_layer_attributes(original: nn.Module, stand_in: nn.Module) -> None:
    """Give a module that replaces a decoder layer the attributes the model reads off that layer."""
    for attribute in LAYER_ATTRIBUTES:
        if hasattr(original, attribute):
            setattr(stand_in, attribute, getattr(original, attribute))


class _Replay(nn.Module):
    """Stands in for a decoder layer below the z-layer: returns fixed hidden states (or its input)."""

    def __init__(self, original: nn.Module, hidden: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple
        copy_layer_attributes(original, self)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states if self.hidden is None else self.hidden
        return (out,) if self.as_tuple else out


@contextmanager
def replay_lower_layers(handle: ModelHandle, z: int, hidden: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Skip layers ``0..z``: the z-layer's output over the window is fixed during a chunk's optimisation."""
    layers = handle.layers
    originals = [layers[i] for i in range(z + 1)]
    try:
        for i in range(z + 1):
            layers[i] = _Replay(originals[i], hidden if i == z else None, as_tuple)
        yield
    finally:
        for i, original in enumerate(originals):
            layers[i] = original


@dataclass
class Replay:
    """The z-layer's output over a window, replayed at every Adam step instead of running layers ``0..z``."""

    hidden: torch.Tensor
    as_tuple: bool


@dataclass
class ForwardResult:
    logits: torch.Tensor
    h: torch.Tensor | None
    """The unperturbed z-layer states at the δ positions, in δ's dtype (``h_init``); ``None`` without δs."""
    z: torch.Tensor
    """The z-layer's whole output (before any δ), detached."""
    z_is_tuple: bool
    """Whether the z-layer returns a tuple (transformers 4.x) rather than a Tensor: what a replay returns."""
    cache: object | None


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x calls the KV cache ``cache``; 4.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


class ResidualForward:
    """Runs ``handle.model`` with ``deltas[i]`` added to the z-layer output at ``(rows[i], positions[i])``.

    ``dtype`` is δ's (float32, or float64 for a float64 model): the states read at the δ positions are
    returned in it. With a ``loss_layer`` below the last layer, logits come from
    ``lm_head(final_norm(h_loss))`` (docs/algorithm.md §3 step 3).
    """

    def __init__(self, handle: ModelHandle, z_layer: int, loss_layer: int, dtype: torch.dtype):
        self.handle, self.z_layer, self.loss_layer, self.dtype = handle, z_layer, loss_layer, dtype
        self._cache_kw = _cache_kwarg(handle.model)
        params = inspect.signature(handle.model.forward).parameters
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None

    def __call__(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        rows: Sequence[int],
        positions: Sequence[int],
        deltas: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: object | None = None,
        want_cache: bool = False,
        replay: Replay | None = None,
        need_logits: bool = True,
    ) -> ForwardResult:
        seen: dict = {"z_is_tuple": replay.as_tuple if replay is not None else False}
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=ids.device)
        pos_t = torch.as_tensor(positions, dtype=torch.long, device=ids.device)

        def perturb(hidden: torch.Tensor) -> torch.Tensor:
            seen["z"] = hidden.detach()
            if not len(rows):
                return hidden
            seen["h"] = hidden[rows_t, pos_t].detach().to(self.dtype)
            return hidden.index_put((rows_t, pos_t), deltas.to(hidden.dtype), accumulate=True)

        def note_structure(_module, _inputs, output) -> None:
            seen["z_is_tuple"] = not isinstance(output, torch.Tensor)

        def grab(hidden: torch.Tensor) -> torch.Tensor:
            seen["loss_h"] = hidden
            return hidden

        with ExitStack() as stack:
            if replay is not None:
                stack.enter_context(
                    replay_lower_layers(self.handle, self.z_layer, replay.hidden, replay.as_tuple)
                )
            z_layer = self.handle.layer(self.z_layer)
            stack.enter_context(edit_layer_output(z_layer, perturb))
            if replay is None:
                stack.callback(z_layer.register_forward_hook(note_structure).remove)
            if self.loss_layer != self.handle.num_layers - 1:
                stack.enter_context(edit_layer_output(self.handle.layer(self.loss_layer), grab))
            out = self.handle.model(**self._kwargs(ids, mask, position_ids, cache, want_cache, need_logits))
        loss_h = seen.get("loss_h")
        logits = out.logits if loss_h is None else self.handle.lm_head(self.handle.final_norm(loss_h))
        cache = _returned_cache(out) if want_cache else None
        return ForwardResult(logits, seen.get("h"), seen["z"], seen["z_is_tuple"], cache)

    def _kwargs(self, ids, mask, position_ids, cache, want_cache: bool, need_logits: bool) -> dict:
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": want_cache}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if not need_logits and self._keep_kw:
            kwargs[self._keep_kw] = 1  # a prefix pass only fills the cache: skip the vocabulary projection
        return kwargs
