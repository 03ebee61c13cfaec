"""Forward hooks that read and perturb the residual stream.

Decoder layers return a Tensor in transformers 5.x and a tuple in 4.x; every hook here accepts both
and returns the same structure it got. Hooks are context managers, so they are removed on errors too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def hidden_of(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states inside a decoder layer's output (Tensor or tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def with_hidden(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    """``output`` with its hidden states replaced, in the structure it came in."""
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden,) + tuple(output[1:])


@contextmanager
def removed_after(handles: Iterable[RemovableHandle]) -> Iterator[None]:
    """Keep the registered hooks ``handles`` inside the block; remove them after it, also on errors."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def edit_layer_output(layer: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a layer's output hidden states by ``fn(hidden)`` while inside the block."""

    def hook(_module, _inputs, output):
        return with_hidden(output, fn(hidden_of(output)))

    with removed_after([layer.register_forward_hook(hook)]):
        yield


@contextmanager
def add_at_positions(
    layer: nn.Module, rows: Sequence[int], positions: Sequence[int], deltas: torch.Tensor
) -> Iterator[None]:
    """Add ``deltas[i]`` to the layer's output at ``(rows[i], positions[i])`` (docs/algorithm.md §3 step 2).

    Positions past the current input length are skipped, so the hook is harmless during ``generate``'s
    length-1 steps.
    """
    if len(rows) == 0:
        yield
        return
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    pos_t = torch.as_tensor(list(positions), dtype=torch.long)

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        keep = pos_t < hidden.shape[1]
        if not bool(keep.any()):
            return hidden
        r, p = rows_t[keep].to(hidden.device), pos_t[keep].to(hidden.device)
        d = deltas[keep.to(deltas.device)].to(hidden.dtype)
        return hidden.index_put((r, p), d, accumulate=True)

    with edit_layer_output(layer, fn):
        yield


class Recorder:
    """Keeps what hooks saw (layer outputs or module inputs), detached."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}


@contextmanager
def record_outputs(layers: dict[str, nn.Module]) -> Iterator[Recorder]:
    """Record each named layer's output hidden states."""
    recorder, handles = Recorder(), []
    for name, layer in layers.items():

        def hook(_m, _i, output, name=name):
            recorder.values[name] = hidden_of(output).detach()

        handles.append(layer.register_forward_hook(hook))
    with removed_after(handles):
        yield recorder


@contextmanager
def record_inputs(modules: dict[str, nn.Module], stop_after: str | None = None) -> Iterator[Recorder]:
    """Record each named module's first input (e.g. a down-projection's key vectors ``k``).

    With ``stop_after``, the forward pass is cut short once that module has run (see ``StopForward``),
    so statistics never pay for layers above the deepest one they need.
    """
    recorder, handles = Recorder(), []
    for name, module in modules.items():

        def hook(_m, inputs, name=name):
            recorder.values[name] = inputs[0].detach()
            if name == stop_after:
                raise StopForward

        handles.append(module.register_forward_pre_hook(hook))
    with removed_after(handles):
        yield recorder


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; caught by ``run_until``."""


def run_until(fn: Callable[[], object]) -> None:
    try:
        fn()
    except StopForward:
        pass
