"""MEMIT's least-squares write (docs/algorithm.md §4.3): ``ΔW = Δz Kᵀ (λC + K_p K_pᵀ + K Kᵀ)⁻¹``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..core.checks import WriterConfigError, check_bool, check_int, check_real
from ..stats.covariance import CovarianceStats, compute_covariance
from .base import WeightWriter, add_to_down_proj

if TYPE_CHECKING:
    from ..core.module import AnyEditModule


class CovarianceWriter(WeightWriter):
    """A writer that needs ``C_l`` of the unedited model (MEMIT, AlphaEdit)."""

    def __init__(
        self,
        stats: CovarianceStats | None = None,
        stats_tokens: int = 100_000,
        corpus="wikipedia-sample",
        solve_dtype: torch.dtype = torch.float64,
        check_fingerprint: bool = True,
    ):
        """``check_fingerprint=False`` skips the check that ``stats`` belong to the model's current weights:
        only for sequential editing, where later edits must use the statistics of the *unedited* model."""
        self.stats, self.stats_tokens, self.corpus, self.solve_dtype = (
            stats,
            stats_tokens,
            corpus,
            solve_dtype,
        )
        self.check_fingerprint = check_fingerprint
        CovarianceWriter.validate(self)

    def validate(self) -> None:
        if self.stats is not None and not isinstance(self.stats, CovarianceStats):
            raise WriterConfigError(
                f"stats must be CovarianceStats (from compute_covariance) or None, got {type(self.stats).__name__}."
            )
        check_int("stats_tokens", self.stats_tokens, 1, WriterConfigError)
        if not isinstance(self.solve_dtype, torch.dtype) or not self.solve_dtype.is_floating_point:
            raise WriterConfigError(
                f"solve_dtype={self.solve_dtype!r}: must be a floating torch.dtype, e.g. torch.float64."
            )
        check_bool("check_fingerprint", self.check_fingerprint, error=WriterConfigError)

    def prepare(self, module: AnyEditModule) -> None:
        if self.stats is None or any(layer not in self.stats.matrices for layer in module.config.layers):
            self.stats = compute_covariance(
                module.model,
                module.tokenizer,
                module.config.layers,
                corpus=self.corpus,
                max_tokens=self.stats_tokens,
                architecture=module.handle.spec,
                trainer=False,
            )
        elif self.check_fingerprint:
            self.stats.check_model(module.model)

    def covariance(self, layer: int, device: torch.device) -> torch.Tensor:
        return self.stats[layer].to(device=device, dtype=self.solve_dtype)

    def residual_solves(
        self, module: AnyEditModule
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        """For ``l = r_1..r_q``: ``(l, K, K_p, Δz, residual)``, the tensors in ``solve_dtype``; ``Δz`` is
        the residual ``Z - H`` spread over the layers not yet written (``/ (q - i)``, docs/algorithm.md
        §4.3) and ``residual`` the mean ‖Z - H‖, for ``log_write``."""
        q, dt = len(module.config.layers), self.solve_dtype
        for i, layer, keys in self.residual_layers(module):
            dz = (keys.Z - keys.H).to(dt) / (q - i)
            yield layer, keys.K.to(dt), keys.K_p.to(dt), dz, float(dz.norm(dim=-1).mean() * (q - i))


class MemitWrite(CovarianceWriter):
    """MEMIT; with ``K_p`` when the module preserves the edited text (MEMIT+AnyEdit).

    ``mom2_weight`` is λ. The authors' 15000 is for 7–8B models; a small model's ``C`` has a different
    scale, so presets set their own (see ``presets.py``).
    """

    name = "memit"

    def __init__(self, mom2_weight: float = 15000.0, **kwargs):
        super().__init__(**kwargs)
        self.mom2_weight = mom2_weight
        MemitWrite.validate(self)

    def validate(self) -> None:
        super().validate()
        check_real(
            "mom2_weight",
            self.mom2_weight,
            error=WriterConfigError,
            hint=" It is λ, the weight of C_l (0 unbinds the solve).",
        )

    def write(self, module: AnyEditModule) -> None:
        for layer, K, K_p, dz, residual in self.residual_solves(module):
            A = self.mom2_weight * self.covariance(layer, K.device) + K.T @ K + K_p.T @ K_p
            update = torch.linalg.solve(A, K.T @ dz)  # ΔWᵀ, m × d
            add_to_down_proj(module.handle, layer, update.T)
            module.log_write(layer, residual=residual, update=float(update.norm()))
