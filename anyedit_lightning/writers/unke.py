"""UnKE's write (docs/algorithm.md §4.3): fine-tune a whole decoder layer so its outputs carry the residual
at the key positions while its outputs on generic text stay as they were."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..core.batching import pad_right
from ..core.checks import WriterConfigError, check_int, check_real
from ..core.hooks import StopForward, hidden_of, removed_after, run_until
from ..stats.corpus import WIKIPEDIA_CHAT, WIKIPEDIA_SAMPLE, wikipedia_chat, wikipedia_sample
from .base import WeightWriter

if TYPE_CHECKING:
    from ..core.module import AnyEditModule


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
    ):
        """``preservation_corpus`` (``wikipedia-sample`` or ``wikipedia-chat``) supplies the default
        preservation texts; ``preservation_weight`` multiplies their loss against the edit's. ``scope``:
        ``"layer"`` tunes every parameter of the layer (the authors' UnKE), ``"mlp"`` only its MLP, whose
        input is the key the other writers edit (attention left as it was: fewer parameters drift)."""
        self.lr, self.steps, self.weight_decay, self.scope = lr, steps, weight_decay, scope
        self.preservation_texts = preservation_texts
        self.preservation_count, self.max_preservation_tokens = preservation_count, max_preservation_tokens
        self.preservation_corpus, self.preservation_weight = preservation_corpus, preservation_weight
        UnkeWrite.validate(self)

    def validate(self) -> None:
        check_real("lr", self.lr, error=WriterConfigError)
        check_int("steps", self.steps, 1, WriterConfigError)
        check_real("weight_decay", self.weight_decay, inclusive=True, error=WriterConfigError)
        check_int("preservation_count", self.preservation_count, 1, WriterConfigError)
        check_int("max_preservation_tokens", self.max_preservation_tokens, 1, WriterConfigError)
        check_real("preservation_weight", self.preservation_weight, error=WriterConfigError)
        if self.scope not in ("layer", "mlp"):
            raise WriterConfigError(f"scope={self.scope!r}: use 'layer' or 'mlp'.")
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
        names = [n for n, _ in module.handle.layer(layer).named_parameters()]
        if self.scope == "layer":
            return names
        layer_prefix = module.handle.spec.layer(layer) + "."
        mlp = module.handle.spec.down_proj_name(layer).removeprefix(layer_prefix).rsplit(".", 1)[0] + "."
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
        pres = [
            module.tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_preservation_tokens]
            for t in self.preservation_texts
        ]
        pres_ids, pres_mask = pad_right(pres, module.pad_id, handle.device)
        for i, layer_index, keys in self.residual_layers(module):
            layer = handle.layer(layer_index)
            seqs = [p.tokenized.ids for p in module.plans]
            ids, mask = pad_right(seqs, module.pad_id, handle.device)
            args_e, kwargs_e, y_edit = _layer_call(handle.model, layer, ids, mask)
            args_p, kwargs_p, y_pres = _layer_call(handle.model, layer, pres_ids, pres_mask)
            target = y_edit.float().clone()
            dz = (keys.Z - keys.H) / (q - i)
            rows = torch.cat(
                [torch.full((len(p.keys),), r, device=ids.device) for r, p in enumerate(module.plans)]
            )
            cols = torch.cat([torch.as_tensor(p.keys, device=ids.device) for p in module.plans])
            target[rows, cols] += dz
            self._fit(
                layer,
                self._tuned(module, layer_index),
                (args_e, kwargs_e, target, mask.bool()),
                (args_p, kwargs_p, y_pres.float(), pres_mask.bool()),
            )
            module.log_write(layer_index, residual=float(dz.norm(dim=-1).mean() * (q - i)), update=0.0)

    def _fit(self, layer: torch.nn.Module, tuned: Sequence[str], edit, preserve) -> None:
        wanted = set(tuned)
        named = [(n, p) for n, p in layer.named_parameters() if n in wanted]
        decay = [p for n, p in named if "norm" not in n and "ln" not in n]
        no_decay = [p for n, p in named if "norm" in n or "ln" in n]
        originals = [p.requires_grad for _, p in named]
        for _, p in named:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    optimizer.zero_grad()
                    loss = sum(
                        weight * F.mse_loss(hidden_of(layer(*args, **kwargs)).float()[keep], target[keep])
                        for (args, kwargs, target, keep), weight in (
                            (edit, 1.0),
                            (preserve, self.preservation_weight),
                        )
                    )
                    loss.backward()
                    optimizer.step()
        finally:
            for (_, p), flag in zip(named, originals):
                p.requires_grad_(flag)
                p.grad = None
