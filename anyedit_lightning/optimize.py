"""Per-chunk residual optimisation (AnyEdit steps 2–3, docs/algorithm.md §3).

For chunk ``j`` of every request a vector ``δ_j`` is added to the z-layer's output at the chunk's key
position and optimised with Adam so the model produces the chunk; earlier chunks' δs stay added.

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
import inspect
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from .batching import pad_right
from .chunking import Chunk, FixedWindow, Semantic, key_positions
from .config import EditConfig
from .hooks import edit_layer_output
from .registry import ModelHandle
from .requests import EditRequest, TokenizedRequest, tokenize_request


class _Replay(nn.Module):
    """Stands in for a decoder layer below the z-layer: returns fixed hidden states (or its input)."""

    def __init__(self, original: nn.Module, hidden: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple
        for attribute in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, attribute):
                setattr(self, attribute, getattr(original, attribute))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states if self.hidden is None else self.hidden
        return (out,) if self.as_tuple else out


@contextmanager
def replay_lower_layers(handle: ModelHandle, z: int, hidden: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Skip layers ``0..z``: the z-layer's output over the window is fixed during a chunk's optimisation."""
    layers = handle.layers
    originals = [layers[i] for i in range(z + 1)]
    try:
        for i in range(z + 1):
            layers[i] = _Replay(originals[i], hidden if i == z else None, as_tuple)
        yield
    finally:
        for i, original in enumerate(originals):
            layers[i] = original


class NonFiniteError(FloatingPointError):
    """A loss or update became NaN/inf; the edit is aborted and weights are left untouched."""


@dataclass
class RequestPlan:
    """One request's chunks, key positions, and (once optimised) its per-chunk targets."""

    tokenized: TokenizedRequest
    chunks: list[Chunk]
    deltas: list[torch.Tensor] = field(default_factory=list)
    h_init: list[torch.Tensor] = field(default_factory=list)
    first_key: int | None = None
    """Where the first chunk's δ goes instead of the last prompt token (``EditConfig.first_key``)."""

    @property
    def keys(self) -> list[int]:
        keys = key_positions(self.tokenized.prompt_len, self.chunks)
        if self.first_key is not None and self.chunks and self.chunks[0].start == 0:
            keys[0] = self.first_key
        return keys

    @property
    def targets(self) -> torch.Tensor:
        """``Z``: one row ``h_init + δ`` per chunk (docs/algorithm.md §3 step 5)."""
        return torch.stack([h + d for h, d in zip(self.h_init, self.deltas)])


def make_chunker(config: EditConfig):
    if not config.anyedit:
        return FixedWindow(None)
    if config.chunking == "semantic":
        return Semantic(config.window)
    return FixedWindow(config.window, config.overlap)


def plan_requests(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], config: EditConfig
) -> list[RequestPlan]:
    chunker = make_chunker(config)
    plans = []
    for request in requests:
        tokenized = tokenize_request(tokenizer, request)
        first = tokenized.content_end if config.first_key == "content_end" else None
        plans.append(RequestPlan(tokenized, chunker(tokenized.target_ids, tokenizer), first_key=first))
    return plans


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x calls the KV cache ``cache``; 4.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


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
    """Finds ``δ_j`` for chunk ``j`` of a batch of requests (each request with its own δ)."""

    def __init__(self, handle: ModelHandle, config: EditConfig, pad_id: int):
        self.handle, self.config, self.pad_id = handle, config, pad_id
        self.model = handle.model
        last = handle.num_layers - 1
        self.loss_layer = last if config.loss_layer is None else config.loss_layer
        self._cache_kw = _cache_kwarg(self.model)
        params = inspect.signature(self.model.forward).parameters
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        self._stream: dict | None = None  # the single-request prefix cache, grown chunk by chunk
        # δ, its Adam state and the loss: float32 for half-precision models, float64 for float64 ones.
        self.dtype = torch.promote_types(torch.float32, next(self.model.parameters()).dtype)

    # ---- forward passes ----
    def _forward(
        self,
        ids,
        mask,
        rows,
        positions,
        deltas,
        position_ids=None,
        cache=None,
        want_cache=False,
        replay=None,
        need_logits=True,
    ):
        """Logits with ``deltas`` added at ``(rows, positions)`` of the z-layer output; also the unperturbed
        z-layer states there (``h_init``) and the returned cache."""
        seen: dict = {}
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=ids.device)
        pos_t = torch.as_tensor(positions, dtype=torch.long, device=ids.device)

        def perturb(hidden: torch.Tensor) -> torch.Tensor:
            seen["z"] = hidden.detach()
            if not len(rows):
                return hidden
            seen["h"] = hidden[rows_t, pos_t].detach().to(self.dtype)
            return hidden.index_put((rows_t, pos_t), deltas.to(hidden.dtype), accumulate=True)

        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": want_cache}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if not need_logits and self._keep_kw:
            kwargs[self._keep_kw] = 1  # a prefix pass only fills the cache: skip the vocabulary projection
        loss_out: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            if replay is not None:
                stack.enter_context(replay_lower_layers(self.handle, self.config.z_layer, *replay))
            z_layer = self.handle.layer(self.config.z_layer)
            stack.enter_context(edit_layer_output(z_layer, perturb))
            if replay is None:
                shape = z_layer.register_forward_hook(
                    lambda _m, _i, output: setattr(self, "_z_is_tuple", not isinstance(output, torch.Tensor))
                )
                stack.callback(shape.remove)
            if self.loss_layer != self.handle.num_layers - 1:

                def grab(hidden: torch.Tensor) -> torch.Tensor:
                    loss_out["h"] = hidden
                    return hidden

                stack.enter_context(edit_layer_output(self.handle.layer(self.loss_layer), grab))
            out = self.model(**kwargs)
        logits = out.logits if not loss_out else self.handle.lm_head(self.handle.final_norm(loss_out["h"]))
        self._last_z = seen.get("z")
        return logits, seen.get("h"), _returned_cache(out) if want_cache else None

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

    def _nll(self, inputs: dict, delta: torch.Tensor, label_ids: torch.Tensor, label_mask: torch.Tensor):
        """Mean NLL of each request's chunk tokens (one value per request) and the unperturbed key states."""
        extra = inputs["frozen"]
        rows = extra["rows"] + list(range(len(delta)))
        positions = extra["positions"] + inputs["key_in_window"]
        deltas = torch.cat([extra["deltas"], delta]) if len(extra["rows"]) else delta
        cache = copy.deepcopy(inputs["cache"]) if inputs.get("cache") is not None else None
        logits, h, _ = self._forward(
            inputs["ids"],
            inputs["mask"],
            rows,
            positions,
            deltas,
            inputs.get("position_ids"),
            cache,
            replay=inputs.get("replay"),
        )
        h = h[len(extra["rows"]) :]
        gather = inputs["logit_index"]  # [B, n_labels] positions whose logits predict the labels
        picked = logits.gather(1, gather[..., None].expand(-1, -1, logits.shape[-1])).to(self.dtype)
        nll = F.cross_entropy(picked.transpose(1, 2), label_ids, reduction="none")
        nll = (nll * label_mask).sum(-1) / label_mask.sum(-1)
        return nll, h

    def _frozen(self, active: Sequence[_Active], j: int, device) -> dict:
        """Earlier chunks' δs of each active request, at their key positions."""
        rows, positions, deltas = [], [], []
        for a in active:
            for i in range(j):
                rows.append(a.row)
                positions.append(a.plan.keys[i])
                deltas.append(a.plan.deltas[i])
        stacked = (
            torch.stack(deltas).to(device)
            if deltas
            else torch.zeros(0, self.handle.hidden_size, device=device)
        )
        return {"rows": rows, "positions": positions, "deltas": stacked}

    def _reference_inputs(self, active: Sequence[_Active], j: int, device) -> dict:
        seqs = [a.plan.tokenized.ids[: a.plan.tokenized.prompt_len + a.chunk.end - 1] for a in active]
        ids, mask = pad_right(seqs, self.pad_id, device)
        n = max(len(a.chunk) for a in active)
        index = torch.stack(
            [torch.arange(n, device=device).clamp_max(len(a.chunk) - 1) + a.first_logit for a in active]
        )
        return {
            "ids": ids,
            "mask": mask,
            "frozen": self._frozen(active, j, device),
            "key_in_window": [a.key for a in active],
            "logit_index": index,
        }

    def _fast_inputs(self, active: Sequence[_Active], j: int, device) -> dict:
        windows = [
            a.plan.tokenized.ids[a.key : a.plan.tokenized.prompt_len + a.chunk.end - 1] for a in active
        ]
        ids, window_mask = pad_right(windows, self.pad_id, device)
        width = ids.shape[1]
        position_ids = torch.stack([torch.arange(width, device=device) + a.key for a in active])
        n = max(len(a.chunk) for a in active)
        index = torch.stack(
            [
                torch.arange(n, device=device).clamp_max(len(a.chunk) - 1) + a.first_logit - a.key
                for a in active
            ]
        )
        empty = {
            "rows": [],
            "positions": [],
            "deltas": torch.zeros(0, self.handle.hidden_size, device=device),
        }
        grown = self._grow_prefix(active[0], j, device) if len(active) == 1 else None
        if grown is not None:
            cache, z_window = grown
            mask = torch.ones(1, active[0].key + width, dtype=window_mask.dtype, device=device)
        else:
            cache, prefix_mask = self._rebuild_prefix(active, j, device)
            mask = torch.cat([prefix_mask, window_mask], dim=1)
            z_window = None
            if self.config.skip_lower_layers:
                with torch.no_grad():  # the z-layer states over the window, replayed at every step
                    self._forward(
                        ids,
                        mask,
                        [],
                        [],
                        empty["deltas"],
                        position_ids,
                        copy.deepcopy(cache),
                        need_logits=False,
                    )
                z_window = self._last_z
        replay = (z_window, self._z_is_tuple) if self.config.skip_lower_layers else None
        return {
            "replay": replay,
            "ids": ids,
            "mask": mask,
            "position_ids": position_ids,
            "cache": cache,
            "frozen": empty,
            "key_in_window": [0] * len(active),
            "logit_index": index,
        }

    def _rebuild_prefix(self, active: Sequence[_Active], j: int, device):
        """The prefix of every request (padded to one width) with the earlier δs, run from scratch."""
        prefix_ids, prefix_mask = pad_right(
            [a.plan.tokenized.ids[: a.key] for a in active], self.pad_id, device
        )
        frozen = self._frozen(active, j, device)
        with torch.no_grad():
            _, _, cache = self._forward(
                prefix_ids,
                prefix_mask,
                frozen["rows"],
                frozen["positions"],
                frozen["deltas"],
                want_cache=True,
                need_logits=False,
            )
        return cache, prefix_mask

    def _grow_prefix(self, a: _Active, j: int, device) -> tuple | None:
        """Chunk ``j``'s prefix cache from chunk ``j-1``'s, plus the z-layer states over chunk ``j``'s window.

        One forward runs the tokens from the previous key to the end of this window (``δ_{j-1}`` added at
        the previous key); the cache is then cropped back to this chunk's key.
        """
        ids = a.plan.tokenized.ids
        end = a.plan.tokenized.prompt_len + a.chunk.end - 1
        state = self._stream
        if state is not None and state["plan"] is a.plan and state["j"] == j - 1:
            start, cache = state["key"], state["cache"]
            rows, positions, deltas = [0], [0], a.plan.deltas[j - 1][None].to(device)
        else:  # the first chunk (or a restart): everything before this key, with all earlier δs
            start, cache = 0, None
            frozen = self._frozen([a], j, device)
            rows, positions, deltas = frozen["rows"], frozen["positions"], frozen["deltas"]
        segment = torch.tensor([ids[start:end]], dtype=torch.long, device=device)
        position_ids = torch.arange(start, end, device=device)[None]
        mask = torch.ones(1, end, dtype=torch.long, device=device)
        with torch.no_grad():
            _, _, cache = self._forward(
                segment,
                mask,
                rows,
                positions,
                deltas,
                position_ids,
                cache,
                want_cache=True,
                need_logits=False,
            )
        if not hasattr(cache, "crop"):  # a cache type that cannot be cut back: rebuild per chunk instead
            self._stream = None
            return None
        z_window = self._last_z[:, a.key - start :]
        if end > a.key:
            cache.crop(-(end - a.key))
        self._stream = {"plan": a.plan, "j": j, "key": a.key, "cache": cache}
        return cache, z_window


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
    inputs: dict
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
        nll, h = self.objective._nll(self.inputs, delta, *self.labels)
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
                self.nll_after, _ = self.objective._nll(self.inputs, self.delta[self.rows], *self.labels)
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
