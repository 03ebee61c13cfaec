"""AlphaEdit (docs/algorithm.md §4.3): the MEMIT objective with the update projected onto the null space of
``C_l``, so outputs on the preserved subspace do not move."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..core.checks import WriterConfigError, check_real
from .base import add_to_down_proj
from .memit import CovarianceWriter

if TYPE_CHECKING:
    from ..core.module import AnyEditModule


class AlphaEditWrite(CovarianceWriter):
    """``ΔWᵀ = solve(P (K Kᵀ + K_p K_pᵀ) + α I, P K Δzᵀ)`` with ``P = U Uᵀ`` over eigenvalues of ``C`` below τ.

    The solution lies in the range of ``P`` (``α x = P(b − A x)``), so ``ΔW (I − P) = 0``.
    """

    name = "alphaedit"

    def __init__(self, threshold: float = 2e-2, l2: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        self.threshold, self.l2 = threshold, l2
        self._projectors: dict[int, torch.Tensor] = {}
        AlphaEditWrite.validate(self)

    def validate(self) -> None:
        super().validate()
        check_real(
            "threshold",
            self.threshold,
            error=WriterConfigError,
            hint=" It is τ; <= 0 leaves an empty null space.",
        )
        check_real(
            "l2", self.l2, error=WriterConfigError, hint=" It is α; 0 makes the projected solve singular."
        )

    def projector(self, layer: int, device: torch.device) -> torch.Tensor:
        if layer not in self._projectors:
            values, vectors = torch.linalg.eigh(self.covariance(layer, device))
            null = vectors[:, values < self.threshold]
            self._projectors[layer] = null @ null.T
        return self._projectors[layer].to(device)

    def write(self, module: AnyEditModule) -> None:
        for layer, K, K_p, dz, residual in self.residual_solves(module, self.requests_to_solve(module)):
            P = self.projector(layer, K.device)
            eye = torch.eye(P.shape[0], dtype=K.dtype, device=K.device)
            update = torch.linalg.solve(P @ (K.T @ K + K_p.T @ K_p) + self.l2 * eye, P @ K.T @ dz)
            add_to_down_proj(module.handle, layer, update.T)
            module.log_write(layer, residual=residual, update=float(update.norm()))
