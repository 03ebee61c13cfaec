"""MEMIT's least-squares write (docs/algorithm.md §4.3): ``ΔW = Δz Kᵀ (λC + K_p K_pᵀ + K Kᵀ)⁻¹``."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from ..core.checks import WriterConfigError, check_bool, check_int, check_real
from ..core.ledger import KeyFit, KeyTargets, ledger_of, reset_to_anchors, unedited_weights
from ..core.planning import RequestPlan
from ..stats.covariance import CovarianceStats, compute_covariance
from .base import WeightWriter, add_to_down_proj

if TYPE_CHECKING:
    from ..core.module import AnyEditModule

log = logging.getLogger(__name__)


class CovarianceWriter(WeightWriter):
    """A writer that needs ``C_l`` of the unedited model (MEMIT, AlphaEdit).

    With ``retain=True`` (the default) a write into a model that already carries kept edits of the same
    kind (its edit ledger) solves them all again, jointly with the new requests, from the layers'
    unedited weights: the result is the batch write of every kept edit, so a new edit cannot overwrite
    an earlier one (docs/algorithm.md §4.6). ``retain=False`` writes on top of the current weights.
    """

    def __init__(
        self,
        stats: CovarianceStats | None = None,
        stats_tokens: int = 100_000,
        corpus="wikipedia-sample",
        solve_dtype: torch.dtype = torch.float64,
        check_fingerprint: bool = True,
        retain: bool = True,
    ):
        """``stats`` must belong to the unedited model: the model as it is, or, once it carries kept
        edits, as it was before the first (the ledger knows its fingerprint). ``check_fingerprint=False``
        skips that check (e.g. for a model whose ledger was lost)."""
        self.stats, self.stats_tokens, self.corpus, self.solve_dtype = (
            stats,
            stats_tokens,
            corpus,
            solve_dtype,
        )
        self.check_fingerprint, self.retain = check_fingerprint, retain
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
        check_bool("retain", self.retain, error=WriterConfigError)

    def prepare(self, module: AnyEditModule) -> None:
        # C of the unedited model (docs/algorithm.md §4.3): before its kept edits, if it carries any
        with unedited_weights(module.model) as ledger:
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
                unedited = ledger.entries[0].base if len(ledger) else None
                self.stats.check_model(module.model, fingerprint=unedited)

    def covariance(self, layer: int, device: torch.device) -> torch.Tensor:
        return self.stats[layer].to(device=device, dtype=self.solve_dtype)

    def fit_record(self, module: AnyEditModule) -> KeyFit:
        config = module.config
        return KeyFit(
            method=self.name,
            layers=tuple(config.layers),
            z_layer=config.z_layer,
            preserve=config.use_preserved_keys,
            keys=[torch.tensor(plan.keys, dtype=torch.long) for plan in module.plans],
            targets=[plan.targets.detach().float().cpu() for plan in module.plans],
        )

    def requests_to_solve(self, module: AnyEditModule) -> list[RequestPlan | KeyTargets]:
        """The module's requests, after the kept edits' when this write retains them; in that case the
        edited parameters are first put back at their unedited values (the ledger's anchors)."""
        ledger = ledger_of(module.model)
        kept = ledger.at_layers(module.config.layers) if self.retain else []
        if not kept:
            return list(module.plans)
        fit, names, anchors = self.fit_record(module), self.parameter_names(module), ledger.anchors()
        if any(e.fit is None or not e.fit.solves_like(fit) for e in kept) or not set(names) <= set(anchors):
            log.warning(
                "%d kept edit(s) in layers %s were written by another method or with other layers; this %s "
                "write cannot solve them again with its own and writes on top of them (it may overwrite them).",
                len(kept),
                list(module.config.layers),
                self.name,
            )
            return list(module.plans)
        reset_to_anchors(module.model, names)
        return [*(r for entry in kept for r in entry.keyed()), *module.plans]

    def residual_solves(
        self, module: AnyEditModule, requests: Sequence[RequestPlan | KeyTargets]
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        """For ``l = r_1..r_q``: ``(l, K, K_p, Δz, residual)`` over ``requests``, the tensors in
        ``solve_dtype``; ``Δz`` is the residual ``Z - H`` spread over the layers not yet written
        (``/ (q - i)``, docs/algorithm.md §4.3) and ``residual`` the mean ‖Z - H‖, for ``log_write``."""
        q, dt = len(module.config.layers), self.solve_dtype
        for i, layer, keys in self.residual_layers(module, requests):
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
        for layer, K, K_p, dz, residual in self.residual_solves(module, self.requests_to_solve(module)):
            A = self.mom2_weight * self.covariance(layer, K.device) + K.T @ K + K_p.T @ K_p
            update = torch.linalg.solve(A, K.T @ dz)  # ΔWᵀ, m × d
            add_to_down_proj(module.handle, layer, update.T)
            module.log_write(layer, residual=residual, update=float(update.norm()))
