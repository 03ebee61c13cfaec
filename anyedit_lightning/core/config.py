"""Typed, declarative hyperparameters for an edit (docs/algorithm.md §3, §7)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .checks import check_config_fields


@dataclass
class EditConfig:
    """How the per-chunk targets are found (AnyEdit steps 1–3; docs/algorithm.md §3, §7).

    Each field is documented where it is declared. ``__post_init__`` checks every field's type and
    range (:func:`~anyedit_lightning.core.checks.check_config_fields`); the checks that need the model
    (layer indices in range, ``loss_layer`` above the z-layer) run in ``validate_config``.
    """

    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    """Edited layers ``R`` (consecutive, ascending); the last one is the z-layer."""
    loss_layer: int | None = None
    """Layer whose output gives the logits (``None``: the last layer, i.e. the model's logits)."""
    anyedit: bool = True
    """Chunk the target autoregressively and preserve the rest of the text (``K_p``); ``False`` gives the
    single-token baseline (one chunk, key = last prompt token, no ``K_p``)."""
    chunking: Literal["fixed", "semantic"] = "fixed"
    """``"fixed"`` windows of ``window`` tokens with ``overlap``, or ``"semantic"`` (sentence/line ends
    merged up to ``window`` tokens)."""
    window: int = 40
    """Tokens per chunk (at most, with ``"semantic"``)."""
    overlap: int = 0
    """Tokens shared by consecutive ``"fixed"`` chunks; ``0 <= overlap < window``."""
    v_steps: int = 25
    """Adam steps of each chunk's δ optimisation (authors: 25)."""
    v_lr: float = 0.5
    """Adam learning rate of the δ optimisation (authors: 0.5)."""
    clamp: float = 4.0
    """After each step δ is scaled back onto ‖δ‖ ≤ clamp·‖h‖, ``h`` the z-layer's output (authors: 4)."""
    v_weight_decay: float = 1e-3
    """Weight of the penalty ‖δ‖ / ‖h‖² added to the δ loss (authors: 1e-3)."""
    early_stop: float = 1e-2
    """A request's δ stops once its loss (NLL + penalty) is below this (authors: 1e-2); 0 never stops early."""
    fast: bool = True
    """Cache the prefix and optimise δ on the chunk's positions only (same δs; see ``optimize.py``);
    ``False`` runs the full model over the whole prefix every step (the reference)."""
    skip_lower_layers: bool = True
    """With ``fast``, replay the z-layer's output over the chunk instead of running layers ``0..z`` at
    every step (they cannot change inside a chunk's optimisation)."""
    preserve_keys: bool | None = None
    """Use the other positions of the edited sequences as ``K_p`` in the write (AnyEdit's addition);
    ``None`` follows ``anyedit``."""
    first_key: Literal["prompt_end", "content_end", "content_word"] = "prompt_end"
    """Where the first chunk's δ goes: ``"prompt_end"`` (the last prompt token, the authors' choice),
    ``"content_end"`` (the last token of the user's own text, before the chat template's closing markup)
    or ``"content_word"`` (the user's last word token: ``content_end`` moved back over trailing
    punctuation such as the "?" every question shares). The template's last token is the same in every
    chat prompt, so a δ written there reaches every prompt's answer (docs/faithful.md)."""

    def __post_init__(self) -> None:
        check_config_fields(self)  # types and ranges now; validate_config adds the model-dependent checks

    @property
    def z_layer(self) -> int:
        """The layer whose output δ is added to: the last edited layer."""
        return self.layers[-1]

    @property
    def use_preserved_keys(self) -> bool:
        """Whether the write preserves ``K_p``: ``preserve_keys``, else ``anyedit``."""
        return self.anyedit if self.preserve_keys is None else self.preserve_keys

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (for saving with results and fingerprints)."""
        return asdict(self)
