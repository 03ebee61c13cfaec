"""The weight write (AnyEdit step 4) as a Lightning ``Callback``, shared by every method.

Once the last chunk of a batch is optimised (``on_train_end``), a writer turns the per-chunk targets
``Z`` into weight updates. Writes are atomic: every touched tensor is snapshotted first and restored
bit-exactly if anything fails (an exception, an interrupt, or a non-finite value).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import lightning as L
import torch

from ..core.batching import pad_right
from ..core.hooks import record_inputs, record_outputs
from ..core.ledger import KeyFit, KeyTargets, LedgerEntry, ledger_of
from ..core.optimize import NonFiniteError
from ..core.planning import RequestPlan
from ..core.weights import restore, snapshot
from ..models.fingerprint import weights_fingerprint
from ..models.registry import ModelHandle

if TYPE_CHECKING:
    from ..core.module import AnyEditModule


@contextmanager
def atomic_update(model: torch.nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Snapshot ``names``; restore them exactly on any exception or non-finite result."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"Cannot snapshot unknown parameters {missing}")
    saved = snapshot(params, names)
    try:
        yield saved
        bad = [n for n in names if not torch.isfinite(params[n]).all()]
        if bad:
            raise NonFiniteError(f"The write produced non-finite weights in {bad}; the edit was rolled back.")
    except BaseException:
        restore(params, saved)
        raise


@dataclass
class Keys:
    """What one layer's write needs: keys at the chunk keys (``K``), elsewhere (``K_p``), and ``H``."""

    K: torch.Tensor  # [N, m]
    K_p: torch.Tensor  # [P, m]
    H: torch.Tensor  # [N, d]
    Z: torch.Tensor  # [N, d]


def collect_keys(
    handle: ModelHandle,
    requests: Sequence[RequestPlan | KeyTargets],
    layer: int,
    z_layer: int,
    preserve: bool,
    pad_id: int,
) -> Keys:
    """Run the current model over each request and gather ``K``, ``K_p`` and ``H`` (docs/algorithm.md §4.1).

    Without preservation each sequence is run only up to its last key: for the single-token baselines
    that is the prompt, so keys come from it alone (causal attention: nothing after a key changes it).
    """
    device = handle.device
    keyed = [r.keyed() if isinstance(r, RequestPlan) else r for r in requests]
    seqs = [r.ids if preserve else r.ids[: max(r.keys) + 1] for r in keyed]
    ids, mask = pad_right(seqs, pad_id, device)
    with (
        torch.no_grad(),
        record_inputs({"k": handle.down_proj(layer)}) as ins,
        record_outputs({"z": handle.layer(z_layer)}) as outs,
    ):
        handle.model(input_ids=ids, attention_mask=mask, use_cache=False)
    k_all, h_all = ins.values["k"].float(), outs.values["z"].float()
    is_key = torch.zeros_like(mask, dtype=torch.bool)
    for row, r in enumerate(keyed):
        is_key[row, r.keys] = True
    rows = torch.cat([torch.full((len(r.keys),), row, device=device) for row, r in enumerate(keyed)])
    cols = torch.cat([torch.as_tensor(r.keys, device=device) for r in keyed])
    preserved = mask.bool() & ~is_key if preserve else torch.zeros_like(is_key)
    Z = torch.cat([r.targets.to(device=device, dtype=torch.float32) for r in keyed])
    return Keys(K=k_all[rows, cols], K_p=k_all[preserved], H=h_all[rows, cols], Z=Z)


def ledger_entry(
    module: AnyEditModule, base: str, anchor: Mapping[str, torch.Tensor], fit: KeyFit | None = None
) -> LedgerEntry:
    """The ledger entry of the write just made: each request's ids and the written layers' outputs on
    them; ``anchor``: the values before it of the parameters no earlier kept edit touched; ``fit``: what
    a closed-form write solved for."""
    handle, layers = module.handle, module.config.layers
    seqs = [p.tokenized.ids for p in module.plans]
    ids, mask = pad_right(seqs, module.pad_id, handle.device)
    with torch.no_grad(), record_outputs({str(n): handle.layer(n) for n in layers}) as outs:
        handle.model(input_ids=ids, attention_mask=mask, use_cache=False)
    outputs = {
        n: [outs.values[str(n)][row, : len(seq)].float().cpu() for row, seq in enumerate(seqs)]
        for n in layers
    }
    sequences = [torch.tensor(seq, dtype=torch.long) for seq in seqs]
    anchor = {name: value.detach().cpu() for name, value in anchor.items()}  # ``before`` is a copy already
    return LedgerEntry(sequences, outputs, base, weights_fingerprint(handle.model), anchor, fit)


def add_to_down_proj(handle: ModelHandle, layer: int, update: torch.Tensor) -> None:
    """``W_l += ΔW`` with ``ΔW`` given as ``d × m``, in the weight's own layout and dtype."""
    weight = handle.down_proj_weight(layer)
    with torch.no_grad():
        weight.add_((update.T if handle.spec.transposed else update).to(weight.dtype))


class WeightWriter(L.Callback):
    """Base class: subclasses say which parameters they touch and how to update them.

    Subclass it for a new method: implement ``parameter_names`` and ``write``.
    """

    name = "writer"

    def parameter_names(self, module: AnyEditModule) -> list[str]:
        return [module.handle.spec.down_proj_name(layer) + ".weight" for layer in module.config.layers]

    def prepare(self, module: AnyEditModule) -> None:
        """Work done before the optimisation starts (e.g. loading statistics of the unedited model)."""

    def write(self, module: AnyEditModule) -> None:
        raise NotImplementedError

    def fit_record(self, module: AnyEditModule) -> KeyFit | None:
        """What the ledger keeps of this write for later joint re-solves (closed-form writers only)."""
        return None

    def validate(self) -> None:
        """Raise ``WriterConfigError`` for a setting of the wrong type or out of range (before any write)."""

    def setup(self, trainer: L.Trainer, pl_module: AnyEditModule, stage: str) -> None:
        self.validate()  # again: settings may have been changed since __init__
        self.prepare(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: AnyEditModule) -> None:
        if not pl_module.ready_to_write:
            raise RuntimeError("The chunk optimisation did not finish; nothing was written.")
        names = self.parameter_names(pl_module)
        # the ledger of the edits the model carries now (docs/algorithm.md §4.6), read by retaining writes
        base = weights_fingerprint(pl_module.model)
        ledger = ledger_of(pl_module.model)
        ledger.sync(base)
        anchored = ledger.anchors()
        with atomic_update(pl_module.model, names) as before:
            self.write(pl_module)
            first = {n: v for n, v in before.items() if n not in anchored}
            entry = ledger_entry(pl_module, base, first, self.fit_record(pl_module))
        ledger.push(entry)
        pl_module.record_write(self.name, before)

    def residual_layers(
        self, module: AnyEditModule, requests: Sequence[RequestPlan | KeyTargets] | None = None
    ) -> Iterator[tuple[int, int, Keys]]:
        """For ``l = r_1..r_q``: ``(i, l, keys)`` with keys collected on the model as updated so far, over
        ``requests`` (default: the module's plans)."""
        config, requests = module.config, module.plans if requests is None else requests
        for i, layer in enumerate(config.layers):
            keys = collect_keys(
                module.handle, requests, layer, config.z_layer, config.use_preserved_keys, module.pad_id
            )
            yield i, layer, keys
