"""``AnyEditModule``: an edit as a Lightning fit, one training step per chunk (docs/algorithm.md §3).

The module owns the frozen model and the requests. Each training step optimises the residual δ of one
chunk index for every request of the batch (the progress bar advances by chunk, the logger records each
chunk's NLL before/after, δ norm and steps). The weight write is a ``Callback`` (see ``writers``).

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

from .config import EditConfig
from .optimize import DeltaOptimizer, plan_requests
from .registry import ArchitectureSpec, resolve_architecture
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
        self._optimizer: DeltaOptimizer | None = None

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

    def configure_optimizers(self):
        return None  # δ has its own Adam per chunk; the model itself is never trained

    def on_fit_start(self) -> None:
        for plan in self.plans:  # a re-run starts from scratch
            plan.deltas.clear()
            plan.h_init.clear()
        self.chunk_metrics.clear()
        self.write_metrics.clear()
        self._optimizer = DeltaOptimizer(self.handle, self.config, self.pad_id)

    def training_step(self, batch: int, batch_idx: int) -> None:
        self.model.eval()  # Lightning switches to train mode; dropout must stay off
        j = int(batch)
        metrics = self._optimizer.optimise(self.plans, j)
        for row, values in enumerate(metrics):
            self.chunk_metrics.append({"chunk": j, "request": row, **values})
        summary = {
            key: sum(m[key] for m in metrics) / len(metrics)
            for key in ("nll_before", "nll_after", "delta_norm", "steps")
        }
        self.log_dict(
            {f"chunk/{k}": float(v) for k, v in summary.items()}, on_step=True, prog_bar=True, batch_size=1
        )

    def on_fit_end(self) -> None:
        self.model.eval()

    # ---- called by writers -------------------------------------------------------------------------
    def log_write(self, layer: int, **values: float) -> None:
        self.write_metrics.append({"layer": layer, **values})

    def record_write(self, method: str, before: dict[str, torch.Tensor]) -> None:
        self.edit_record = EditRecord(method, before, list(self.chunk_metrics), list(self.write_metrics))
