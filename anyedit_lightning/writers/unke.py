"""UnKE's write (docs/algorithm.md §4.3): fine-tune a whole decoder layer so its outputs carry the residual
at the key positions while its outputs on generic text stay as they were."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from itertools import islice
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..core.batching import pad_right
from ..core.checks import WriterConfigError, check_bool, check_int, check_real
from ..core.hooks import StopForward, hidden_of, removed_after, run_until
from ..core.ledger import ledger_of, reset_to_anchors
from ..core.precision import AUTO, resolve_compute_dtype
from ..core.variants import question_variants
from ..core.weights import weights_swapped
from ..stats.corpus import WIKIPEDIA_CHAT, WIKIPEDIA_SAMPLE, wikipedia_chat, wikipedia_sample
from .base import WeightWriter

if TYPE_CHECKING:
    from ..core.module import AnyEditModule

_COMPUTE_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_COMPUTE_DTYPE_NAMES = (*_COMPUTE_DTYPES, AUTO)


def _layer_call(model, layer, ids, mask):
    """The exact arguments the model passes to ``layer`` (masks, rotary embeddings, ...), and its output.

    Calling the layer again with these reproduces the model's own computation for any architecture.
    """
    seen = {}

    def pre(_m, args, kwargs):
        seen["args"], seen["kwargs"] = args, dict(kwargs)

    def post(_m, _i, output):
        seen["out"] = hidden_of(output).detach()
        raise StopForward

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
    with removed_after(handles), torch.no_grad():
        run_until(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False))
    kwargs = {
        k: v for k, v in seen["kwargs"].items() if k not in ("cache", "past_key_values", "past_key_value")
    }
    kwargs["use_cache"] = False
    return seen["args"], kwargs, seen["out"]


def _module_io(model, module, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of ``module`` (an MLP: a per-token function) in the model's forward on ``ids``."""
    seen = {}

    def post(_m, inputs, output):
        seen["x"], seen["y"] = inputs[0].detach(), hidden_of(output).detach()
        raise StopForward

    with removed_after([module.register_forward_hook(post)]), torch.no_grad():
        run_until(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False))
    return seen["x"], seen["y"]


def _mlp_name(module: AnyEditModule, layer: int) -> str:
    """The model's name of layer ``layer``'s MLP: the module holding its down projection."""
    return module.handle.spec.down_proj_name(layer).rsplit(".", 1)[0]


def _edit_target(y: torch.Tensor, edit) -> torch.Tensor:
    """The outputs ``y`` on the edit sequences with the residual added at the keys, non-padding rows only."""
    ids, mask, rows, cols, dz = edit
    target = y.float().clone()
    target[rows, cols] += dz
    return target[mask.bool()]


def _text_groups(count: int, batch: int | None) -> list[torch.Tensor]:
    """The preservation texts split into seeded groups of ``batch`` (one group of all when None)."""
    if batch is None or batch >= count:
        return [torch.arange(count)]
    return list(torch.randperm(count, generator=torch.Generator().manual_seed(0)).split(batch))


def _is_norm(name: str) -> bool:
    """A normalisation weight (RMSNorm/LayerNorm gain or bias): never decayed, optionally not tuned."""
    return "norm" in name or "ln" in name


def _cycling(items: Sequence):
    """A function returning ``items`` in turn, round and round: one preservation group per step."""
    turn = itertools.count()
    return lambda: items[next(turn) % len(items)]


def default_preservation_texts(
    count: int = 20, chars: int = 600, corpus: str = WIKIPEDIA_SAMPLE, tokenizer=None
) -> list[str]:
    """Generic text the layer must keep producing (authors: random instruction examples).

    ``wikipedia-chat``: ``count`` exchanges spread evenly over :func:`~anyedit_lightning.stats.corpus.wikipedia_chat`
    (chat-formatted, like the prompts an edit must leave alone; docs/faithful.md).
    """
    if corpus == WIKIPEDIA_CHAT:
        texts = wikipedia_chat(tokenizer)
        return texts[:: max(1, len(texts) // count)][:count]
    return [text[:chars] for text in islice(wikipedia_sample(), count)]


class UnkeWrite(WeightWriter):
    """Fine-tunes all parameters of each edited layer (authors: one layer, ``[7]``) with AdamW."""

    name = "unke"

    def __init__(
        self,
        lr: float = 2e-4,
        steps: int = 50,
        weight_decay: float = 0.01,
        preservation_texts: Sequence[str] | None = None,
        preservation_count: int = 20,
        max_preservation_tokens: int = 128,
        preservation_corpus: str = WIKIPEDIA_SAMPLE,
        preservation_weight: float = 1.0,
        scope: str = "layer",
        preservation_positions: int | None = None,
        preservation_batch: int | None = None,
        retain: bool = True,
        retention_batch: int | None = 8,
        retention_weight: float = 1.0,
        preserve_original: bool = True,
        steps_per_request: int = 0,
        refit: bool = False,
        compute_dtype: str | None = None,
        tune_norms: bool = True,
        question_variants: int = 0,
        variant_drop: float = 0.3,
    ):
        """``preservation_corpus`` (``wikipedia-sample`` or ``wikipedia-chat``) supplies the default
        preservation texts; ``preservation_weight`` multiplies their loss against the edit's. ``scope``:
        ``"layer"`` tunes every parameter of the layer (the authors' UnKE), ``"mlp"`` only its MLP, whose
        input is the key the other writers edit (attention left as it was: fewer parameters drift).

        With ``scope="mlp"`` the layer's attention is fixed, so the MLP's inputs are computed once and the
        fit runs on the MLP alone, token by token; ``preservation_positions`` then draws that many preservation
        tokens at each step (a seeded sample, fresh per step; None: all of them), the main cost of the write
        (docs/algorithm.md §4.3). ``preservation_batch`` (either scope) uses that many preservation texts per
        step, a different group each step in turn: the full objective in expectation at a fraction of the cost.

        ``retain``: also fit the outputs that earlier edits kept in this model left in the layer (the
        model's edit ledger, docs/algorithm.md §4.6), ``retention_batch`` of their requests per step in
        turn (None: all of them), their loss weighted ``retention_weight``; so edits made one after another
        do not overwrite each other, at a cost per step that does not grow with their number.
        ``preserve_original``: the preservation texts' targets are the layer's outputs before the first
        kept edit (the ledger's anchor) instead of the current layer's (the authors'), so drift on
        unrelated text does not add up edit after edit: after six kept edits of UnKEBench test records,
        agreement with the unedited model 0.887 / 0.845 (everyday prompts / MQuAKE questions) against
        0.871 / 0.742 preserving the current layer, every edit still verbatim (docs/results/retention.md).
        No difference for a first edit.

        ``steps_per_request``: extra steps for each request beyond the first in one write (a batch edit),
        whose fit has that many more targets to reach in the same layer. ``refit``: with kept edits in the
        layer, start the fit from the layer's unedited weights (the ledger's anchors) and fit every kept
        request (its recorded outputs) with the new ones, as one batch write would, instead of fitting on
        top of the current weights; the steps then count the kept requests too.

        ``compute_dtype`` (``"bfloat16"`` or ``"float16"``; None: the model's dtype): run the fit's forward
        and backward passes under autocast in that dtype, weights, targets, losses and AdamW's state staying
        in the model's dtype (mixed precision). The write is compute-bound (thousands of tokens a step), so
        it pays on hardware with fast bf16 matmuls (recent GPUs, CPUs with AVX512-BF16 or AMX): 1.45-1.6x
        faster on this project's CPU at the same efficacy and locality (docs/results/speed.md). ``"auto"``
        (the small-model preset's): bf16 for float32 weights on such hardware, else the model's dtype.

        ``tune_norms=False`` leaves the layer's normalisation weights as they are (the authors tune them):
        each is one gain per hidden dimension applied to every token, so moving it changes the layer for
        every input, and AdamW moves it by about ``lr`` a step whatever its gradient (the preset's write
        grows them 0.6-3.1 % per edit on SmolLM2; docs/results/retention.md).

        ``question_variants``: also fit each request's residuals on that many wordings of its prompt with
        words left out (each with probability ``variant_drop``; :mod:`anyedit_lightning.core.variants`), so
        the write is not bound to the prompt's exact words (paraphrases; docs/algorithm.md §4.3)."""
        self.lr, self.steps, self.weight_decay, self.scope = lr, steps, weight_decay, scope
        self.preservation_positions, self.preservation_batch = preservation_positions, preservation_batch
        self.preservation_texts = preservation_texts
        self.preservation_count, self.max_preservation_tokens = preservation_count, max_preservation_tokens
        self.preservation_corpus, self.preservation_weight = preservation_corpus, preservation_weight
        self.retain, self.retention_batch, self.retention_weight = retain, retention_batch, retention_weight
        self.preserve_original, self.steps_per_request = preserve_original, steps_per_request
        self.refit, self.compute_dtype, self.tune_norms = refit, compute_dtype, tune_norms
        self.question_variants, self.variant_drop = question_variants, variant_drop
        UnkeWrite.validate(self)

    def validate(self) -> None:
        check_real("lr", self.lr, error=WriterConfigError)
        check_int("steps", self.steps, 1, WriterConfigError)
        check_int("steps_per_request", self.steps_per_request, 0, WriterConfigError)
        check_real("weight_decay", self.weight_decay, inclusive=True, error=WriterConfigError)
        check_int("preservation_count", self.preservation_count, 1, WriterConfigError)
        check_int("max_preservation_tokens", self.max_preservation_tokens, 1, WriterConfigError)
        check_real("preservation_weight", self.preservation_weight, error=WriterConfigError)
        if self.scope not in ("layer", "mlp"):
            raise WriterConfigError(f"scope={self.scope!r}: use 'layer' or 'mlp'.")
        for name in ("preservation_batch", "retention_batch"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, WriterConfigError)
        check_bool("retain", self.retain, error=WriterConfigError)
        check_bool("refit", self.refit, error=WriterConfigError)
        check_bool("preserve_original", self.preserve_original, error=WriterConfigError)
        check_bool("tune_norms", self.tune_norms, error=WriterConfigError)
        check_int("question_variants", self.question_variants, 0, WriterConfigError)
        if not (isinstance(self.variant_drop, (int, float)) and 0.0 < self.variant_drop < 1.0):
            raise WriterConfigError(
                f"variant_drop={self.variant_drop!r}: the chance of leaving out each word, between 0 and 1."
            )
        check_real("retention_weight", self.retention_weight, error=WriterConfigError)
        if self.compute_dtype not in _COMPUTE_DTYPE_NAMES:
            raise WriterConfigError(
                f"compute_dtype={self.compute_dtype!r}: use one of {sorted(_COMPUTE_DTYPE_NAMES, key=str)} "
                "(None: the model's own dtype; 'auto': bf16 where the hardware multiplies it natively)."
            )
        if self.preservation_positions is not None:
            check_int("preservation_positions", self.preservation_positions, 1, WriterConfigError)
            if self.scope != "mlp":
                raise WriterConfigError(
                    "preservation_positions needs scope='mlp' (a whole layer's attention reads whole "
                    "sequences, so its preservation text cannot be sampled token by token)."
                )
        if self.preservation_corpus not in (WIKIPEDIA_SAMPLE, WIKIPEDIA_CHAT):
            raise WriterConfigError(
                f"preservation_corpus={self.preservation_corpus!r}: use {WIKIPEDIA_SAMPLE!r} or "
                f"{WIKIPEDIA_CHAT!r}, or pass your own preservation_texts=."
            )
        texts = self.preservation_texts
        if texts is not None and (
            not isinstance(texts, (list, tuple))
            or not texts
            or not all(isinstance(t, str) and t.strip() for t in texts)
        ):
            raise WriterConfigError(
                "preservation_texts must be None or a non-empty list of non-empty strings, got "
                f"{texts!r:.80}."
            )

    def _tuned(self, module: AnyEditModule, layer: int) -> list[str]:
        """Names, inside decoder layer ``layer``, of the parameters this write tunes."""
        names = [
            n for n, _ in module.handle.layer(layer).named_parameters() if self.tune_norms or not _is_norm(n)
        ]
        if self.scope == "layer":
            return names
        mlp = _mlp_name(module, layer).removeprefix(module.handle.spec.layer(layer) + ".") + "."
        return [n for n in names if n.startswith(mlp)]

    def parameter_names(self, module: AnyEditModule) -> list[str]:
        return [
            module.handle.spec.layer(layer) + "." + name
            for layer in module.config.layers
            for name in self._tuned(module, layer)
        ]

    def prepare(self, module: AnyEditModule) -> None:
        if self.preservation_texts is None:
            self.preservation_texts = default_preservation_texts(
                self.preservation_count, corpus=self.preservation_corpus, tokenizer=module.tokenizer
            )

    def write(self, module: AnyEditModule) -> None:
        handle, q = module.handle, len(module.config.layers)
        steps = self.steps + self.steps_per_request * (len(module.plans) - 1)
        kept = ledger_of(module.model).at_layers(module.config.layers) if self.retain else []
        if self.refit and kept:
            reset_to_anchors(module.model, self.parameter_names(module))
            steps += self.steps_per_request * sum(len(entry.sequences) for entry in kept)
        pres = [
            module.tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_preservation_tokens]
            for t in self.preservation_texts
        ]
        pres_ids, pres_mask = pad_right(pres, module.pad_id, handle.device)
        plans, owners = self._edit_sequences(module)
        ids, mask = pad_right([p.tokenized.ids for p in plans], module.pad_id, handle.device)
        rows = torch.cat([torch.full((len(p.keys),), r, device=ids.device) for r, p in enumerate(plans)])
        cols = torch.cat([torch.as_tensor(p.keys, device=ids.device) for p in plans])
        for i, layer_index, keys in self.residual_layers(module):
            layer = handle.layer(layer_index)
            residual = (keys.Z - keys.H) / (q - i)
            dz = residual[owners.to(residual.device)]  # each variant's keys take their request's rows
            wanted = set(self._tuned(module, layer_index))
            tuned = [(n, p) for n, p in layer.named_parameters() if n in wanted]
            make_terms = self._mlp_terms if self.scope == "mlp" else self._layer_terms
            terms = make_terms(module, layer_index, (ids, mask, rows, cols, dz), (pres_ids, pres_mask))
            self._fit(tuned, terms, steps)
            module.log_write(layer_index, residual=float(residual.norm(dim=-1).mean() * (q - i)), update=0.0)

    def _edit_sequences(self, module: AnyEditModule) -> tuple[list, torch.Tensor]:
        """The plans the edit term fits (the module's, then each one's question variants) and, per key
        of theirs in order, the row of the module's residuals it takes."""
        firsts = torch.tensor([0] + [len(p.keys) for p in module.plans]).cumsum(0).tolist()
        plans, owners = (
            list(module.plans),
            [torch.arange(len(p.keys)) + firsts[r] for r, p in enumerate(module.plans)],
        )
        for r, plan in enumerate(module.plans):
            for variant in question_variants(
                module.tokenizer, plan, module.config.first_key, self.question_variants, self.variant_drop
            ):
                plans.append(variant)
                owners.append(torch.arange(len(variant.keys)) + firsts[r])
        return plans, torch.cat(owners)

    def _preserved_weights(self, module: AnyEditModule):
        """The weights the preservation targets come from: the unedited values of every parameter the
        kept edits changed (``preserve_original``), else the current ones."""
        anchors = ledger_of(module.model).anchors() if self.preserve_original else {}
        return weights_swapped(module.model, anchors)

    def _retained(self, module: AnyEditModule, layer_index: int) -> list[tuple]:
        """Groups ``(ids, mask, target)`` of the ledger's requests at this layer, ``retention_batch`` each;
        ``target``: the layer's outputs on their non-padding tokens right after their own write."""
        recorded = list(ledger_of(module.model).at_layer(layer_index)) if self.retain else []
        device, groups = module.handle.device, []
        for members in _text_groups(len(recorded), self.retention_batch) if recorded else []:
            ids, mask = pad_right([recorded[m][0].tolist() for m in members], module.pad_id, device)
            target = torch.cat([recorded[m][1] for m in members]).to(device)
            groups.append((ids, mask, target))
        return groups

    def _layer_terms(self, module: AnyEditModule, layer_index: int, edit, preserve) -> list:
        """The loss terms through the whole layer, called with the arguments the model gives it."""
        model, layer = module.handle.model, module.handle.layer(layer_index)

        def through_layer(ids, mask, target=None):
            args, kwargs, y = _layer_call(model, layer, ids, mask)
            keep = mask.bool()
            return args, kwargs, y.float()[keep] if target is None else target, keep

        def cycled(groups, weight):
            next_group = _cycling(groups)

            def loss() -> torch.Tensor:
                args, kwargs, target, keep = next_group()
                return weight * F.mse_loss(hidden_of(layer(*args, **kwargs)).float()[keep], target)

            return loss

        ids, mask = edit[:2]
        args_e, kwargs_e, y_e = _layer_call(model, layer, ids, mask)
        terms = [cycled([(args_e, kwargs_e, _edit_target(y_e, edit), mask.bool())], 1.0)]
        groups = []
        with self._preserved_weights(module):
            for texts in _text_groups(preserve[0].shape[0], self.preservation_batch):
                pres_mask = preserve[1][texts.to(ids.device)]
                length = int(pres_mask.sum(dim=1).max())  # the group's own padding only
                pres_ids = preserve[0][texts.to(ids.device), :length]
                groups.append(through_layer(pres_ids, pres_mask[:, :length]))
        terms.append(cycled(groups, self.preservation_weight))
        retained = [through_layer(*group) for group in self._retained(module, layer_index)]
        if retained:
            terms.append(cycled(retained, self.retention_weight))
        return terms

    def _mlp_terms(self, module: AnyEditModule, layer_index: int, edit, preserve) -> list:
        """The MLP-scope loss terms on cached MLP inputs: the layer's output is its input plus its attention
        (both fixed) plus the MLP's output, so the residual ``dz`` is added to the MLP's output."""
        handle = module.handle
        if any("post_feedforward" in n for n, _ in handle.layer(layer_index).named_children()):
            raise WriterConfigError(
                "scope='mlp' assumes the MLP's output is added to the residual stream, but this layer "
                "normalises it first (post_feedforward_layernorm); use scope='layer'."
            )
        mlp = handle.model.get_submodule(_mlp_name(module, layer_index))
        x_e, y_e = _module_io(handle.model, mlp, *edit[:2])
        x_e, target = x_e[edit[1].bool()], _edit_target(y_e, edit)
        with self._preserved_weights(module):
            x_p, y_p = _module_io(handle.model, mlp, *preserve)
        keep = preserve[1].bool()
        text_of_row = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
        x_p, y_p = x_p[keep], y_p[keep].float()
        groups = [
            torch.isin(text_of_row, texts.to(keep.device)).nonzero().squeeze(1)
            for texts in _text_groups(keep.shape[0], self.preservation_batch)
        ]
        next_group, sample = _cycling(groups), self.preservation_positions
        generator = torch.Generator().manual_seed(0)

        def preservation_loss() -> torch.Tensor:
            # a fresh seeded sample of the group's rows at every step: over the steps the fit sees them all
            rows = next_group()
            if sample is not None and sample < rows.shape[0]:
                rows = rows[torch.randperm(rows.shape[0], generator=generator)[:sample].to(rows.device)]
            return self.preservation_weight * F.mse_loss(hidden_of(mlp(x_p[rows])).float(), y_p[rows])

        terms = [lambda: F.mse_loss(hidden_of(mlp(x_e)).float(), target), preservation_loss]
        retained = []
        for ids, mask, wanted in self._retained(module, layer_index):
            # the MLP's share of the recorded layer output: its output now plus what the layer lacks
            x_r, y_r = _module_io(handle.model, mlp, ids, mask)
            y_layer = _layer_call(handle.model, handle.layer(layer_index), ids, mask)[2]
            keep_r = mask.bool()
            retained.append((x_r[keep_r], y_r[keep_r].float() + wanted - y_layer[keep_r].float()))
        if retained:
            next_retained = _cycling(retained)

            def retention_loss() -> torch.Tensor:
                x_r, wanted = next_retained()
                return self.retention_weight * F.mse_loss(hidden_of(mlp(x_r)).float(), wanted)

            terms.append(retention_loss)
        return terms

    def _fit(self, tuned: Sequence[tuple[str, torch.nn.Parameter]], terms, steps: int) -> None:
        """``steps`` of AdamW on the ``tuned`` parameters, minimising the sum of the ``terms`` (each a
        function that computes its weighted loss from the current weights); norms are not decayed."""
        norms = [p for n, p in tuned if _is_norm(n)]
        decay = [p for n, p in tuned if not _is_norm(n)]
        originals = [p.requires_grad for _, p in tuned]
        for _, p in tuned:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": norms, "weight_decay": 0.0}],
            lr=self.lr,
        )
        weight = tuned[0][1]
        precision = _COMPUTE_DTYPES[resolve_compute_dtype(self.compute_dtype, weight.device, weight.dtype)]
        try:
            with torch.enable_grad():
                for _ in range(steps):
                    optimizer.zero_grad()
                    with torch.autocast(weight.device.type, dtype=precision, enabled=precision is not None):
                        loss = sum(term() for term in terms)
                    loss.backward()
                    optimizer.step()
        finally:
            for (_, p), flag in zip(tuned, originals):
                p.requires_grad_(flag)
                p.grad = None
