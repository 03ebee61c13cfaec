"""``AnyEditModule``: an edit as a Lightning fit, one training step per chunk (docs/algorithm.md §3).

The module owns the frozen model and the requests. Each training step optimises the residual δ of one
chunk index for every request of the batch (the progress bar advances by chunk, the logger records each
chunk's NLL before/after, δ norm and steps). The weight write is a ``Callback`` (see ``writers``).

What is trained is δ, not the model: ``configure_optimizers`` returns Adam over δ (one row per request),
and each ``training_step`` runs the chunk's Adam loop with Lightning's manual optimisation
(``manual_backward``, ``optimizer.step``); δ and Adam's state are reset at the start of every chunk.
δ is a plain tensor, not a parameter of the module, so it stays float32 (float64 for a float64 model)
whatever the Trainer's precision; so do the writers' solves.

Precision: the Trainer's ``precision`` applies to the model's forward passes. ``"bf16-true"`` (or
``"16-true"``) makes Lightning cast the module, hence the model's weights, to that dtype in place before
the fit; the edit is then computed and written in that dtype, and the weights stay in it after the fit
(``edit_record.before`` holds the cast weights, so a revert returns to them). ``"bf16-mixed"`` leaves the
weights as they are and runs the forwards under autocast.

Example:
    >>> module = AnyEditModule(model, tokenizer, [EditRequest("Who is Ada Quill?", long_answer)])
    >>> Trainer(max_epochs=1, callbacks=[MemitWrite(mom2_weight=...)]).fit(module)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..models.registry import ArchitectureSpec, resolve_architecture
from .config import EditConfig
from .optimize import ChunkRun, DeltaOptimizer
from .planning import plan_requests
from .requests import EditRequest
from .validation import validate_edit


@dataclass
class EditRecord:
    """What a finished write changed: the touched tensors before the write (to build patches or revert)."""

    method: str
    before: dict[str, torch.Tensor]
    chunk_metrics: list[dict] = field(default_factory=list)
    write_metrics: list[dict] = field(default_factory=list)


class AnyEditModule(L.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        config: EditConfig | None = None,
        architecture: ArchitectureSpec | None = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.requests = list(requests)
        self.config = config or EditConfig()
        self.handle = resolve_architecture(model, architecture)
        validate_edit(self.handle, self.config, self.requests)
        self.plans = plan_requests(tokenizer, self.requests, self.config)
        validate_edit(self.handle, self.config, self.requests, self.plans)
        self.automatic_optimization = False
        self.chunk_metrics: list[dict] = []
        self.write_metrics: list[dict] = []
        self.edit_record: EditRecord | None = None
        self.objective: DeltaOptimizer | None = None
        self.delta: torch.Tensor | None = None

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    @property
    def num_chunk_steps(self) -> int:
        return max(len(plan.chunks) for plan in self.plans)

    @property
    def ready_to_write(self) -> bool:
        return all(len(plan.deltas) == len(plan.chunks) for plan in self.plans)

    # ---- Lightning hooks ---------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(range(self.num_chunk_steps)), batch_size=None, shuffle=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over δ, one row per request; the model itself is never trained.

        Lightning calls this after placing and casting the module, so δ is made on the model's device
        and in float32 (float64 for a float64 model), outside the module's parameters where the
        precision plugin would cast it.
        """
        self.objective = DeltaOptimizer(self.handle, self.config, self.pad_id)
        size = (len(self.plans), self.handle.hidden_size)
        self.delta = torch.zeros(
            size, dtype=self.objective.dtype, device=self.handle.device, requires_grad=True
        )
        return torch.optim.Adam([self.delta], lr=self.config.v_lr)

    def on_fit_start(self) -> None:
        for plan in self.plans:  # a re-run starts from scratch
            plan.deltas.clear()
            plan.h_init.clear()
        self.chunk_metrics.clear()
        self.write_metrics.clear()
        # Lightning (>= 2.2) keeps each submodule's train/eval mode as it finds it and warns when a fit
        # starts with modules in eval mode. The module is being fitted, so it enters the loop in train
        # mode; the frozen model goes back to eval (dropout off) in ``on_train_start``, before any forward.
        self.train()

    def on_train_start(self) -> None:
        self.model.eval()

    def training_step(self, batch: int, batch_idx: int) -> None:
        j = int(batch)
        optimizer = self.optimizers()
        self._reset_delta(optimizer.optimizer)
        chunk: ChunkRun = self.objective.start(self.plans, j, self.delta)
        while (loss := chunk.loss()) is not None:
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            chunk.after_step()
        metrics = chunk.finish()
        for row, values in enumerate(metrics):
            self.chunk_metrics.append({"chunk": j, "request": row, **values})
        summary = {
            key: sum(m[key] for m in metrics) / len(metrics)
            for key in ("nll_before", "nll_after", "delta_norm", "steps")
        }
        self.log_dict(
            {f"chunk/{k}": float(v) for k, v in summary.items()}, on_step=True, prog_bar=True, batch_size=1
        )

    def _reset_delta(self, optimizer: torch.optim.Optimizer) -> None:
        """Every chunk starts from δ = 0 with fresh Adam moments (docs/algorithm.md §3 step 4)."""
        with torch.no_grad():
            self.delta.zero_()
        optimizer.state.clear()

    def on_fit_end(self) -> None:
        self.model.eval()

    # ---- called by writers -------------------------------------------------------------------------
    def log_write(self, layer: int, **values: float) -> None:
        """Keep a write's per-layer metrics and send them to the Trainer's loggers, if any.

        Writers call this from ``on_train_end``, where ``self.log`` is not allowed, so the loggers are
        called directly, at the step after the last chunk.
        """
        self.write_metrics.append({"layer": layer, **values})
        metrics = {f"write/layer_{layer}/{name}": float(value) for name, value in values.items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.num_chunk_steps)

    def record_write(self, method: str, before: dict[str, torch.Tensor]) -> None:
        self.edit_record = EditRecord(method, before, list(self.chunk_metrics), list(self.write_metrics))
