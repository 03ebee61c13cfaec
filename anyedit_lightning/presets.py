"""Hyperparameter presets per model (ALGORITHM.md §7); small-model values come from the dev split only."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .config import EditConfig


@dataclass(frozen=True)
class Preset:
    """An ``EditConfig`` per method plus the writer's own settings (e.g. λ, τ, α)."""

    edit: dict[str, dict[str, Any]]
    writer: dict[str, dict[str, Any]]
    stats_tokens: int = 100_000
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self, method: str, anyedit: bool, **overrides: Any) -> EditConfig:
        values = {**self.edit.get("all", {}), **self.edit.get(method, {}), "anyedit": anyedit, **overrides}
        return replace(EditConfig(), **values)

    def writer_kwargs(self, method: str) -> dict[str, Any]:
        return dict(self.writer.get(method, {}))


AUTHORS_LLAMA3_8B = Preset(
    edit={"all": {"layers": [4, 5, 6, 7, 8], "window": 40}, "unke": {"layers": [7]}},
    writer={"memit": {"mom2_weight": 15000.0}, "alphaedit": {"threshold": 2e-2, "l2": 10.0}, "unke": {}},
    notes="The authors' settings for Llama3-8B-Instruct (ALGORITHM.md §7).",
)
AUTHORS_QWEN25_7B = replace(
    AUTHORS_LLAMA3_8B,
    edit={"all": {"layers": [4, 5, 6, 7, 8], "window": 50}, "unke": {"layers": [7]}},
    notes="The authors' settings for Qwen2.5-7B-Instruct (ALGORITHM.md §7).",
)

SMOLLM2_135M = Preset(
    edit={"all": {"layers": [3, 4, 5, 6, 7], "window": 40}, "unke": {"layers": [7]}},
    writer={"memit": {"mom2_weight": 100.0}, "alphaedit": {"threshold": 2e-2, "l2": 10.0}, "unke": {}},
    stats_tokens=100_000,
    notes="Placeholder until the dev-split search.",
)

PRESETS: dict[str, Preset] = {
    "smollm2-135m-instruct": SMOLLM2_135M,
    "llama3-8b-instruct": AUTHORS_LLAMA3_8B,
    "qwen2.5-7b-instruct": AUTHORS_QWEN25_7B,
    "authors": AUTHORS_LLAMA3_8B,
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"Unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
