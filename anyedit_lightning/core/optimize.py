"""Per-chunk residual optimisation (AnyEdit steps 2–3, docs/algorithm.md §3).

For chunk ``j`` of every request a vector ``δ_j`` is added to the z-layer's output at the chunk's key
position and optimised with Adam so the model produces the chunk; earlier chunks' δs stay added.
``DeltaOptimizer.start`` prepares a chunk and returns a ``ChunkRun``, the loss / post-step / finish of its
Adam loop; the loop itself, δ and Adam belong to ``AnyEditModule`` (Lightning's manual optimisation).
Requests are planned in ``planning.py``; the perturbed forward pass is ``forward.py``.

Two paths compute the same δs:
- reference (``fast=False``): the whole model over ``prompt ++ target[:end-1]`` at every Adam step;
- fast (``fast=True``): nothing before the key position depends on ``δ_j``, so the prefix is run once
  per chunk (with the earlier δs) into a key/value cache, and every Adam step runs only the chunk's
  own positions against that cache. Cost per step falls from the whole prefix to the chunk's length.
Both use the model's own forward (with explicit position ids and a padding mask), so every registered
architecture that supports a KV cache takes the fast path.

On a CPU each Adam step of the fast path is bound by reading the weights of the layers above the z-layer,
not by the chunk's few tokens, so the remaining cost is the per-chunk prefix. For a single request the
prefix cache is therefore grown incrementally: chunk ``j``'s cache is chunk ``j-1``'s, extended by the
tokens between the two keys with ``δ_{j-1}`` added (one forward over the new tokens, which also yields the
next window's z-layer states; the cache is then cropped back to the key). Batches of several requests,
whose prefixes are padded to a common width, rebuild the prefix per chunk.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.registry import ModelHandle
from .batching import pad_right
from .chunking import Chunk
from .config import EditConfig
from .forward import Replay, ResidualForward
from .planning import RequestPlan


class NonFiniteError(FloatingPointError):
    """A loss or update became NaN/inf; the edit is aborted and weights are left untouched."""


@dataclass
class Perturbation:
    """δs already fixed, added at ``(rows[i], positions[i])`` of the z-layer output."""

    rows: list[int]
    positions: list[int]
    values: torch.Tensor


@dataclass
class ChunkInputs:
    """What every Adam step of a chunk runs: the tokens (the whole sequence, or the fast path's window),
    the earlier δs, where each δ_j goes, and which logits predict the labels."""

    ids: torch.Tensor
    mask: torch.Tensor
    frozen: Perturbation
    key_in_window: list[int]
    logit_index: torch.Tensor
    position_ids: torch.Tensor | None = None
    cache: object | None = None
    replay: Replay | None = None


@dataclass
class _Active:
    """What one request contributes to chunk ``j``'s batched optimisation."""

    row: int
    """The request's row in this chunk's padded batch (requests without a chunk ``j`` are left out)."""
    index: int
    """The request's row in δ (its place in the plans)."""
    plan: RequestPlan
    chunk: Chunk
    key: int

    @property
    def labels(self) -> list[int]:
        p = self.plan.tokenized.prompt_len
        return list(self.plan.tokenized.ids[p + self.chunk.start : p + self.chunk.end])

    @property
    def first_logit(self) -> int:
        """The position whose logits predict the chunk's first token (the key, unless ``first_key`` moved it)."""
        return self.plan.tokenized.prompt_len + self.chunk.start - 1


class DeltaOptimizer:
    """The objective of ``δ_j`` for chunk ``j`` of a batch of requests (each request with its own δ row):
    builds each chunk's inputs (reference or fast path) and computes the NLL; the caller steps Adam."""

    def __init__(self, handle: ModelHandle, config: EditConfig, pad_id: int):
        self.handle, self.config, self.pad_id = handle, config, pad_id
        self._stream: dict | None = None  # the single-request prefix cache, grown chunk by chunk
        # δ, its Adam state and the loss: float32 for half-precision models, float64 for float64 ones.
        self.dtype = torch.promote_types(torch.float32, next(handle.model.parameters()).dtype)
        loss_layer = handle.num_layers - 1 if config.loss_layer is None else config.loss_layer
        self.forward = ResidualForward(handle, config.z_layer, loss_layer, self.dtype)

    # ---- one chunk --------------------------------------------------------------------------------
    def start(self, plans: Sequence[RequestPlan], j: int, delta: torch.Tensor) -> ChunkRun:
        """Set up ``δ_j``'s optimisation for every request that has a chunk ``j``.

        ``delta`` holds one row per request of ``plans`` (zero at the start of the chunk); its optimizer
        belongs to the caller, which drives the loop (``AnyEditModule.training_step``).
        """
        having = [(index, plan) for index, plan in enumerate(plans) if j < len(plan.chunks)]
        active = [_Active(row, index, p, p.chunks[j], p.keys[j]) for row, (index, p) in enumerate(having)]
        if not active:
            raise ValueError(f"No request has a chunk {j}.")
        device = self.handle.device
        use_fast = self.config.fast and all(a.key >= 1 for a in active)
        inputs = (
            self._fast_inputs(active, j, device) if use_fast else self._reference_inputs(active, j, device)
        )
        labels = pad_right([a.labels for a in active], self.pad_id, device)
        return ChunkRun(self, j, active, inputs, labels, delta)

    def chunk_done(self, j: int) -> None:
        """Release the single-request prefix cache after its last chunk."""
        if self._stream is not None and j == len(self._stream["plan"].chunks) - 1:
            self._stream = None

    def nll(
        self, inputs: ChunkInputs, delta: torch.Tensor, label_ids: torch.Tensor, label_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean NLL of each request's chunk tokens (one value per request) and the unperturbed key states."""
        frozen = inputs.frozen
        fixed = len(frozen.rows)
        out = self.forward(
            inputs.ids,
            inputs.mask,
            frozen.rows + list(range(len(delta))),
            frozen.positions + inputs.key_in_window,
            torch.cat([frozen.values, delta]) if fixed else delta,
            inputs.position_ids,
            copy.deepcopy(inputs.cache) if inputs.cache is not None else None,
            replay=inputs.replay,
        )
        logits, gather = out.logits, inputs.logit_index
        picked = logits.gather(1, gather[..., None].expand(-1, -1, logits.shape[-1])).to(self.dtype)
        nll = F.cross_entropy(picked.transpose(1, 2), label_ids, reduction="none")
        nll = (nll * label_mask).sum(-1) / label_mask.sum(-1)
        return nll, out.h[fixed:]

    # ---- each path's inputs ---------------------------------------------------------------------------
    def _frozen(self, active: Sequence[_Active], j: int, device: torch.device) -> Perturbation:
        """Earlier chunks' δs of each active request, at their key positions."""
        rows, positions, deltas = [], [], []
        for a in active:
            for i in range(j):
                rows.append(a.row)
                positions.append(a.plan.keys[i])
                deltas.append(a.plan.deltas[i])
        if not deltas:
            return self._no_deltas(device)
        return Perturbation(rows, positions, torch.stack(deltas).to(device))

    def _no_deltas(self, device: torch.device) -> Perturbation:
        return Perturbation([], [], torch.zeros(0, self.handle.hidden_size, device=device))

    @staticmethod
    def _logit_index(active: Sequence[_Active], device: torch.device, window: bool) -> torch.Tensor:
        """``[B, n_labels]``: the positions whose logits predict each chunk's labels (padded rows repeat
        their last position); relative to the key when only the window is run (``window=True``)."""
        n = max(len(a.chunk) for a in active)
        steps = torch.arange(n, device=device)
        return torch.stack(
            [steps.clamp_max(len(a.chunk) - 1) + a.first_logit - (a.key if window else 0) for a in active]
        )

    def _reference_inputs(self, active: Sequence[_Active], j: int, device: torch.device) -> ChunkInputs:
        seqs = [a.plan.tokenized.ids[: a.plan.tokenized.prompt_len + a.chunk.end - 1] for a in active]
        ids, mask = pad_right(seqs, self.pad_id, device)
        frozen = self._frozen(active, j, device)
        return ChunkInputs(
            ids, mask, frozen, [a.key for a in active], self._logit_index(active, device, False)
        )

    def _fast_inputs(self, active: Sequence[_Active], j: int, device: torch.device) -> ChunkInputs:
        """The window ``key_j … p + b − 2`` of each request, run against a prefix cache (docs/algorithm.md §3.1)."""
        windows = [
            a.plan.tokenized.ids[a.key : a.plan.tokenized.prompt_len + a.chunk.end - 1] for a in active
        ]
        ids, window_mask = pad_right(windows, self.pad_id, device)
        width = ids.shape[1]
        position_ids = torch.stack([torch.arange(width, device=device) + a.key for a in active])
        grown = self._grow_prefix(active[0], j, device) if len(active) == 1 else None
        if grown is not None:
            cache, replay = grown
            mask = torch.ones(1, active[0].key + width, dtype=window_mask.dtype, device=device)
        else:
            cache, prefix_mask = self._rebuild_prefix(active, j, device)
            mask = torch.cat([prefix_mask, window_mask], dim=1)
            replay = (
                self._window_states(ids, mask, position_ids, cache) if self.config.skip_lower_layers else None
            )
        return ChunkInputs(
            ids,
            mask,
            self._no_deltas(device),
            [0] * len(active),
            self._logit_index(active, device, True),
            position_ids,
            cache,
            replay if self.config.skip_lower_layers else None,
        )

    def _window_states(self, ids, mask, position_ids, cache) -> Replay:
        """The z-layer's output over the window, computed once and replayed at every Adam step."""
        with torch.no_grad():
            out = self.forward(
                ids,
                mask,
                [],
                [],
                self._no_deltas(ids.device).values,
                position_ids,
                copy.deepcopy(cache),
                need_logits=False,
            )
        return Replay(out.z, out.z_is_tuple)

    def _rebuild_prefix(self, active: Sequence[_Active], j: int, device: torch.device):
        """The prefix of every request (padded to one width) with the earlier δs, run from scratch."""
        prefix_ids, prefix_mask = pad_right(
            [a.plan.tokenized.ids[: a.key] for a in active], self.pad_id, device
        )
        frozen = self._frozen(active, j, device)
        with torch.no_grad():
            out = self.forward(
                prefix_ids,
                prefix_mask,
                frozen.rows,
                frozen.positions,
                frozen.values,
                want_cache=True,
                need_logits=False,
            )
        return out.cache, prefix_mask

    def _grow_prefix(self, a: _Active, j: int, device: torch.device) -> tuple[object, Replay] | None:
        """Chunk ``j``'s prefix cache from chunk ``j-1``'s, plus the z-layer states over chunk ``j``'s window.

        One forward runs the tokens from the previous key to the end of this window (``δ_{j-1}`` added at
        the previous key); the cache is then cropped back to this chunk's key.
        """
        ids = a.plan.tokenized.ids
        end = a.plan.tokenized.prompt_len + a.chunk.end - 1
        state = self._stream
        if state is not None and state["plan"] is a.plan and state["j"] == j - 1:
            start, cache = state["key"], state["cache"]
            fixed = Perturbation([0], [0], a.plan.deltas[j - 1][None].to(device))
        else:  # the first chunk (or a restart): everything before this key, with all earlier δs
            start, cache = 0, None
            fixed = self._frozen([a], j, device)
        segment = torch.tensor([ids[start:end]], dtype=torch.long, device=device)
        position_ids = torch.arange(start, end, device=device)[None]
        mask = torch.ones(1, end, dtype=torch.long, device=device)
        with torch.no_grad():
            out = self.forward(
                segment,
                mask,
                fixed.rows,
                fixed.positions,
                fixed.values,
                position_ids,
                cache,
                want_cache=True,
                need_logits=False,
            )
        cache = out.cache
        if not hasattr(cache, "crop"):  # a cache type that cannot be cut back: rebuild per chunk instead
            self._stream = None
            return None
        if end > a.key:
            cache.crop(-(end - a.key))
        self._stream = {"plan": a.plan, "j": j, "key": a.key, "cache": cache}
        return cache, Replay(out.z[:, a.key - start :], out.z_is_tuple)


@dataclass
class ChunkRun:
    """Chunk ``j``'s Adam loop, stepped by the caller (docs/algorithm.md §3 step 4).

    The caller owns δ and its optimizer and runs ``while (loss := run.loss()) is not None``: backward,
    optimizer step, ``run.after_step()``. This object computes the loss of the requests still running,
    holds stopped requests' δ fixed, clamps δ, and at ``finish`` stores ``δ_j`` and ``h_init`` in the plans.
    """

    objective: DeltaOptimizer
    j: int
    active: list[_Active]
    inputs: ChunkInputs
    labels: tuple[torch.Tensor, torch.Tensor]
    delta: torch.Tensor
    steps_done: int = 0
    h_init: torch.Tensor | None = None
    nll_before: torch.Tensor | None = None
    nll_after: torch.Tensor | None = None
    held: torch.Tensor | None = None

    def __post_init__(self) -> None:
        device = self.delta.device
        self.rows = torch.tensor([a.index for a in self.active], dtype=torch.long, device=device)
        self.done = torch.zeros(len(self.active), dtype=torch.bool, device=device)
        self.steps = torch.zeros(len(self.active), dtype=torch.long)

    def loss(self) -> torch.Tensor | None:
        """The summed loss of the requests still running; ``None`` once all have stopped or ``v_steps`` ran."""
        config = self.objective.config
        if self.steps_done == config.v_steps:
            return None
        self.steps_done += 1
        delta = self.delta[self.rows]
        nll, h = self.objective.nll(self.inputs, delta, *self.labels)
        if self.h_init is None:
            self.h_init, self.nll_before = h, nll.detach().clone()
        loss = nll + config.v_weight_decay * delta.norm(dim=-1) / self.h_init.norm(dim=-1) ** 2
        if not torch.isfinite(loss).all():
            raise NonFiniteError(f"non-finite loss while optimising chunk {self.j} (loss={loss.tolist()})")
        self.done |= loss.detach() < config.early_stop
        if bool(self.done.all()):
            self.nll_after = nll.detach()  # every δ is frozen at the value this NLL was computed with
            return None
        self.steps += (~self.done).long().cpu()
        self.held = self.delta.detach()[self.rows[self.done]].clone()
        return loss[~self.done].sum()

    def after_step(self) -> None:
        """Put stopped requests' δ back, then scale every δ onto the ball ``‖δ‖ ≤ c·‖h_init‖``."""
        with torch.no_grad():
            self.delta[self.rows[self.done]] = self.held
            delta = self.delta[self.rows]
            limit = self.objective.config.clamp * self.h_init.norm(dim=-1)
            norm = delta.norm(dim=-1)
            scale = torch.where(norm > limit, limit / norm.clamp_min(1e-12), torch.ones_like(norm))
            self.delta[self.rows] = delta * scale[:, None]
        if not torch.isfinite(self.delta).all():
            raise NonFiniteError(f"non-finite δ while optimising chunk {self.j}")

    def finish(self) -> list[dict[str, float]]:
        """Append ``δ_j`` and ``h_init`` to each active request's plan; returns per-request metrics."""
        if self.nll_after is None:
            with torch.no_grad():
                self.nll_after, _ = self.objective.nll(self.inputs, self.delta[self.rows], *self.labels)
        self.objective.chunk_done(self.j)
        metrics = []
        for a in self.active:
            d = self.delta[a.index].detach().clone()
            a.plan.deltas.append(d)
            a.plan.h_init.append(self.h_init[a.row].clone())
            metrics.append(
                {
                    "nll_before": float(self.nll_before[a.row]),
                    "nll_after": float(self.nll_after[a.row]),
                    "delta_norm": float(d.norm()),
                    "h_norm": float(self.h_init[a.row].norm()),
                    "steps": int(self.steps[a.row]),
                    "tokens": len(a.chunk),
                }
            )
        return metrics
