"""Where each architecture keeps the modules editing touches.

Editing needs four places in a decoder: the decoder layers (to read and perturb the residual
stream), the MLP down-projection MEMIT rewrites, and the final norm and LM head (to turn a hidden
state into logits). Names differ by family; this registry maps ``config.model_type`` to templates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module-name templates for one architecture (``{}`` stands for the layer index).

    Attributes:
        layers: the ``ModuleList`` holding the decoder layers (``model.layers``).
        down_proj: the MLP down-projection inside one layer, as a template (``model.layers.{}.mlp.down_proj``).
        final_norm: the norm applied before the LM head.
        lm_head: the output projection to the vocabulary.
        transposed: whether ``down_proj.weight`` is stored ``m × d`` (GPT-2 ``Conv1D``) instead of ``d × m``.
    """

    layers: str
    down_proj: str
    final_norm: str
    lm_head: str
    transposed: bool = False

    def layer(self, index: int) -> str:
        return f"{self.layers}.{index}"

    def down_proj_name(self, index: int) -> str:
        return self.down_proj.format(index)


_LLAMA_LIKE = ArchitectureSpec("model.layers", "model.layers.{}.mlp.down_proj", "model.norm", "lm_head")

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "gpt2": ArchitectureSpec(
        "transformer.h", "transformer.h.{}.mlp.c_proj", "transformer.ln_f", "lm_head", True
    ),
    "gpt_neox": ArchitectureSpec(
        "gpt_neox.layers", "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "lm_head"
    ),
}


_HEAD_ALIASES = ("lm_head", "embed_out")


class UnsupportedArchitectureError(ValueError):
    """No templates are known for a model; the message says how to supply them."""


def register_architecture(model_type: str, spec: ArchitectureSpec) -> None:
    """Add or replace the templates for ``config.model_type`` (e.g. a family not listed here)."""
    ARCHITECTURES[model_type] = spec


@dataclass(frozen=True)
class ModelHandle:
    """A model together with its resolved architecture: the one place that turns names into modules."""

    model: nn.Module
    spec: ArchitectureSpec

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.spec.layers)

    def layer(self, index: int) -> nn.Module:
        return self.layers[index]

    def down_proj(self, index: int) -> nn.Module:
        return self.model.get_submodule(self.spec.down_proj_name(index))

    def down_proj_weight(self, index: int) -> nn.Parameter:
        return self.down_proj(index).weight

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.spec.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        try:
            return self.model.get_submodule(self.spec.lm_head)
        except AttributeError:  # renamed across transformers versions (GPT-NeoX: embed_out -> lm_head)
            if self.spec.lm_head not in _HEAD_ALIASES or not hasattr(self.model, "get_output_embeddings"):
                raise
            head = self.model.get_output_embeddings()
            if head is None:
                raise
            return head

    def weight_as_out_in(self, index: int) -> torch.Tensor:
        """``W_l`` as ``d × m`` whatever the storage layout (a view, not a copy)."""
        weight = self.down_proj_weight(index)
        return weight.T if self.spec.transposed else weight

    @property
    def hidden_size(self) -> int:
        return self.weight_as_out_in(0).shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.weight_as_out_in(0).shape[1]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.down_proj_weight(0).dtype


def resolve_architecture(
    model: nn.Module, spec: ArchitectureSpec | None = None, **overrides: str | bool
) -> ModelHandle:
    """Find the templates for ``model`` (or use ``spec``), apply ``overrides``, and check they resolve.

    Example:
        >>> handle = resolve_architecture(model)                                   # detected
        >>> handle = resolve_architecture(model, down_proj="model.layers.{}.ffn.w2")  # one template changed
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if spec is None:
        spec = ARCHITECTURES.get(model_type)
        if spec is None:
            raise UnsupportedArchitectureError(
                f"No module templates are registered for model_type={model_type!r}. Supply them, e.g.\n"
                "    from anyedit_lightning import ArchitectureSpec, register_architecture\n"
                f"    register_architecture({model_type!r}, ArchitectureSpec(layers='model.layers', "
                "down_proj='model.layers.{}.mlp.down_proj', final_norm='model.norm', lm_head='lm_head'))\n"
                "or pass `architecture=ArchitectureSpec(...)` to the editor. Known: "
                + ", ".join(sorted(ARCHITECTURES))
            )
    if overrides:
        spec = replace(spec, **overrides)
    handle = ModelHandle(model, spec)
    try:
        layers = handle.layers
        handle.down_proj(0), handle.final_norm, handle.lm_head  # noqa: B018 - resolution check
    except AttributeError as error:
        raise UnsupportedArchitectureError(
            f"The templates {spec} do not match this {type(model).__name__} ({error}). "
            "Pass corrected templates with `architecture=ArchitectureSpec(...)` or register_architecture()."
        ) from None
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{spec.layers!r} is a {type(layers).__name__}, expected a ModuleList."
        )
    return handle
