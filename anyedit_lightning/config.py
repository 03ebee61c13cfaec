"""Typed, declarative hyperparameters for an edit (docs/algorithm.md §3, §7)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from .checks import check_config_fields


@dataclass
class EditConfig:
    """How the per-chunk targets are found (AnyEdit steps 1–3).

    Attributes:
        layers: edited layers ``R`` (consecutive, ascending); the last one is the z-layer.
        loss_layer: layer whose output gives the logits (``None``: the last layer, i.e. the model's logits).
        anyedit: chunk the target autoregressively and preserve the rest of the text (``K_p``); ``False``
            gives the single-token baseline (one chunk, key = last prompt token, no ``K_p``).
        chunking: ``"fixed"`` windows of ``window`` tokens with ``overlap``, or ``"semantic"`` (sentence/line
            ends merged up to ``window`` tokens).
        v_steps, v_lr, clamp, v_weight_decay, early_stop: the δ optimisation (authors: 25, 0.5, 4, 1e-3, 1e-2).
        fast: cache the prefix and run the δ optimisation on the chunk's positions only (same δs; see
            ``optimize.py``); ``False`` runs the full model over the whole prefix every step (the reference).
        skip_lower_layers: with ``fast``, replay the z-layer's output over the chunk instead of running layers
            ``0..z`` at every step (they cannot change inside a chunk's optimisation).
        preserve_keys: use the other positions of the edited sequences as ``K_p`` in the write (AnyEdit's
            addition); ``None`` follows ``anyedit``.
        first_key: where the first chunk's δ goes: ``"prompt_end"`` (the last prompt token, the authors'
            choice) or ``"content_end"`` (the last token of the user's own text, before the chat template's
            closing markup). The template's last token is the same in every chat prompt, so a δ written
            there reaches every prompt's answer (docs/faithful.md). ``"content_word"``: the user's last word
            token (``content_end`` moved back over trailing punctuation such as "?", which every question shares).
    """

    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    loss_layer: int | None = None
    anyedit: bool = True
    chunking: Literal["fixed", "semantic"] = "fixed"
    window: int = 40
    overlap: int = 0
    v_steps: int = 25
    v_lr: float = 0.5
    clamp: float = 4.0
    v_weight_decay: float = 1e-3
    early_stop: float = 1e-2
    fast: bool = True
    skip_lower_layers: bool = True
    preserve_keys: bool | None = None
    first_key: Literal["prompt_end", "content_end", "content_word"] = "prompt_end"

    def __post_init__(self) -> None:
        check_config_fields(self)  # types and ranges now; validate_config adds the model-dependent checks

    @property
    def z_layer(self) -> int:
        return self.layers[-1]

    @property
    def use_preserved_keys(self) -> bool:
        return self.anyedit if self.preserve_keys is None else self.preserve_keys

    def to_dict(self) -> dict:
        return asdict(self)
