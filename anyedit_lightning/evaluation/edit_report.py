"""One call after ``edit(...)``: did the edit land, and what did it do to the rest of the model?

Example:
    >>> module = edit(model, tokenizer, EditRequest(prompt, target))
    >>> report = edit_report(model, tokenizer, module)
    >>> print(report)  # efficacy, paraphrase, locality, neighbourhood, fluency, perplexity, sub-facts

The unedited reference comes from ``module.edit_record.before``: the touched tensors are swapped back
for the reference passes and the edited ones restored bit-exactly afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.weights import weights_swapped
from ..metrics import rouge_l_recall
from ..metrics.fluency import Fluency
from ..metrics.subfacts import SubFactHits
from .faithfulness import FaithfulnessOptions, FaithfulnessProbe
from .generation import generate_batch
from .reference import render


@dataclass
class EditReport:
    """Scores of one edit (means over its requests). ``None``: not applicable (no paraphrase, ...).

    ``fluency`` maps ``edited`` / ``paraphrase`` / ``locality`` to ``{"repetition", "degenerate",
    "distinct2"}``; ``answers`` holds the regenerated texts; ``locality_samples`` the regenerated
    set-(a) prompts as ``{"prompt", "before", "after"}``.
    """

    efficacy_rougeL: float
    paraphrase_rougeL: float | None
    locality_agreement: float
    locality_kl: float
    neighbourhood_agreement: float | None
    neighbourhood_kl: float | None
    perplexity_ratio: float | None
    subfact_hits: float | None
    subfact_rougeL: float | None
    cross_agreement: float | None = None
    cross_kl: float | None = None
    fluency: dict[str, dict[str, float]] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)
    locality_samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def degenerate(self) -> float | None:
        """Share of degenerate answers over the edited prompt, paraphrases and regenerated locality prompts."""
        rows = [v for v in self.fluency.values() if v.get("n")]
        n = sum(v["n"] for v in rows)
        return sum(v["degenerate"] * v["n"] for v in rows) / n if n else None

    def __str__(self) -> str:
        def fmt(value: float | None, digits: int = 3) -> str:
            return "–" if value is None else f"{value:.{digits}f}"

        rows = [
            ("Efficacy ROUGE-L (edited prompt)", fmt(self.efficacy_rougeL)),
            ("Paraphrase ROUGE-L", fmt(self.paraphrase_rougeL)),
            ("Locality top-1 agreement (everyday prompts)", fmt(self.locality_agreement)),
            ("Locality KL(unedited ‖ edited), nats/token", fmt(self.locality_kl, 4)),
            ("Other-benchmark agreement / KL", f"{fmt(self.cross_agreement)} / {fmt(self.cross_kl, 4)}"),
            ("Neighbourhood agreement", fmt(self.neighbourhood_agreement)),
            ("Neighbourhood KL, nats/token", fmt(self.neighbourhood_kl, 4)),
            ("Degenerate answers (share)", fmt(self.degenerate)),
            ("Unrelated-text perplexity ratio", fmt(self.perplexity_ratio)),
            ("Sub-fact hits / sub ROUGE-L", f"{fmt(self.subfact_hits)} / {fmt(self.subfact_rougeL)}"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'Measure':<{width}}  Value", f"{'-' * width}  -----"]
        return "\n".join([*lines, *(f"{name:<{width}}  {value}" for name, value in rows)])


def _paraphrases(extra: dict) -> list[str]:
    found = [extra["para_prompt"]] if extra.get("para_prompt") else []
    return found + [p for p in extra.get("paraphrases") or [] if isinstance(p, str) and p not in found]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fluency(texts: list[str]) -> dict[str, float]:
    metric = Fluency()
    metric.update(texts)
    return {**{k: float(v) for k, v in metric.compute().items()}, "n": len(texts)}


def edit_report(
    model: torch.nn.Module,
    tokenizer,
    module,
    *,
    options: FaithfulnessOptions | None = None,
    max_new_tokens: int | None = None,
) -> EditReport:
    """Score a finished edit (an ``AnyEditModule`` from :func:`~anyedit_lightning.edit`).

    Args:
        model, tokenizer: the edited model (as the edit left it; it is left that way).
        module: the finished module; its ``requests`` (with optional ``extra`` keys ``para_prompt`` /
            ``paraphrases``, ``sub_questions`` / ``sub_answers``, ``benchmark``) and ``edit_record``.
        options: probe sizes (default: all 70 everyday prompts, 8 neighbours, 4096 held-out tokens).
        max_new_tokens: answer limit when regenerating edited prompts (default: longest target + 32).
    """
    record = getattr(module, "edit_record", None)
    if record is None:
        raise ValueError("the module has no edit_record: pass the module returned by a finished edit(...)")
    requests = list(module.requests)
    before = record.before
    benchmark = next((r.extra.get("benchmark") for r in requests if r.extra.get("benchmark")), None)
    probe = FaithfulnessProbe(model, tokenizer, benchmark, options)
    with weights_swapped(model, before):
        probe.prepare([r.prompt for r in requests])
    set_scores = probe.measure_edit()
    neighbourhood = [probe.measure_neighbourhood(r.prompt, before) for r in requests]

    if max_new_tokens is None:
        max_new_tokens = (
            max(len(tokenizer(r.target, add_special_tokens=False)["input_ids"]) for r in requests) + 32
        )
    prompts, slots = [], []
    for request in requests:
        extra = request.extra
        slot = {"prompt": len(prompts), "para": [], "sub": []}
        prompts.append(request.prompt)
        for para in _paraphrases(extra):
            slot["para"].append(len(prompts))
            prompts.append(para)
        for question in extra.get("sub_questions") or []:
            slot["sub"].append(len(prompts))
            prompts.append(question)
        slots.append(slot)
    rendered = [request.prompt if request.raw_prompt else None for request in requests]
    texts = [render(tokenizer, p) for p in prompts]
    for slot, raw in zip(slots, rendered):
        if raw is not None:
            texts[slot["prompt"]] = raw
    outputs = [g.text for g in generate_batch(model, tokenizer, texts, max_new_tokens)]

    efficacy, para_scores, sub_scores, answers = [], [], [], []
    hits = SubFactHits()
    edited_texts, para_texts = [], []
    for request, slot in zip(requests, slots):
        answer = outputs[slot["prompt"]]
        edited_texts.append(answer)
        efficacy.append(rouge_l_recall(answer, request.target))
        paras = [outputs[i] for i in slot["para"]]
        para_texts += paras
        para_scores += [rouge_l_recall(p, request.target) for p in paras]
        subs = [outputs[i] for i in slot["sub"]]
        sub_answers = list(request.extra.get("sub_answers") or [])[: len(subs)]
        if subs and len(sub_answers) == len(subs):
            hits.update(subs, sub_answers)
            sub_scores += [rouge_l_recall(p, a) for p, a in zip(subs, sub_answers)]
        answers.append(
            {"prompt": request.prompt, "answer": answer, "paraphrases": paras, "sub_answers": subs}
        )

    fluency = {"edited": _fluency(edited_texts)}
    if para_texts:
        fluency["paraphrase"] = _fluency(para_texts)
    if "locality_fluency" in set_scores:
        fluency["locality"] = {**set_scores["locality_fluency"], "n": len(set_scores["locality_samples"])}
    nb_agree = [n["neighbourhood_agreement"] for n in neighbourhood if n]
    nb_kl = [n["neighbourhood_kl"] for n in neighbourhood if n]
    return EditReport(
        efficacy_rougeL=_mean(efficacy) or 0.0,
        paraphrase_rougeL=_mean(para_scores),
        locality_agreement=set_scores["locality_agreement"],
        locality_kl=set_scores["locality_kl"],
        neighbourhood_agreement=_mean(nb_agree),
        neighbourhood_kl=_mean(nb_kl),
        perplexity_ratio=set_scores.get("perplexity_ratio"),
        subfact_hits=float(hits.compute()) if sub_scores else None,
        subfact_rougeL=_mean(sub_scores),
        cross_agreement=set_scores.get("cross_agreement"),
        cross_kl=set_scores.get("cross_kl"),
        fluency=fluency,
        answers=answers,
        locality_samples=list(set_scores.get("locality_samples", [])),
    )
