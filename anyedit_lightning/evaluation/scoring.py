"""One record of a benchmark run (docs/algorithm.md §6): the answers of the edited model to the prompt,
its paraphrase and the sub-questions, their scores against the references, and the faithfulness row."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric

from ..core.requests import EditRequest, prompt_text
from ..metrics import CharBLEU, Fluency, RougeRecall, SemanticSimilarity, SubFactHits, WordBLEU
from .config import BenchConfig, method_label
from .generation import Generation, generate_batch
from .summary import mean_scores


class RecordScorer:
    """The paper's scores of (prediction, reference) pairs with the torchmetrics classes of
    ``anyedit_lightning.metrics`` (character and word BLEU, ROUGE-1/2/L recall, MiniLM similarity).

    The metrics are reset before every call, so each record's scores are its own: computed in this
    process and never synchronised across ranks (each rank writes its records itself).
    """

    def __init__(self, similarity: bool = True, device: str | torch.device = "cpu"):
        self.metrics: dict[str, Metric] = {
            "char_bleu": CharBLEU(sync_on_compute=False),
            "word_bleu": WordBLEU(sync_on_compute=False),
            "rouge": RougeRecall(sync_on_compute=False),
        }
        if similarity:  # the encoder is loaded on the metric's device, the model's
            self.metrics["similarity"] = SemanticSimilarity(sync_on_compute=False).to(device)

    def __call__(self, predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
        """One dict of scores per pair, keyed like ``METRIC_KEYS``."""
        if not predictions:
            return []
        columns: dict[str, list] = {}
        for name, metric in self.metrics.items():
            metric.reset()
            metric.update(list(predictions), list(references))
            columns[name] = metric.per_item()
        rows = [
            {"char_bleu": char, "word_bleu": word, **rouge}
            for char, word, rouge in zip(columns["char_bleu"], columns["word_bleu"], columns["rouge"])
        ]
        for row, value in zip(rows, columns.get("similarity", ())):
            row["similarity"] = value
        return rows


def generate_answers(
    model: torch.nn.Module, tokenizer, requests: Sequence[EditRequest], config: BenchConfig
) -> list[dict[str, Any]]:
    """All prompts of the batch in one batched generation; regrouped per request
    (``{"prompt": Generation, "para": Generation | None, "sub": [Generation, ...]}``)."""
    prompts: list[str] = []
    slots: list[dict[str, Any]] = []
    for request in requests:
        extra = request.extra
        slot: dict[str, Any] = {"prompt": len(prompts)}
        prompts.append(prompt_text(tokenizer, request))
        if extra.get("para_prompt"):
            slot["para"] = len(prompts)
            prompts.append(prompt_text(tokenizer, dataclasses.replace(request, prompt=extra["para_prompt"])))
        slot["sub"] = []
        for question in extra.get("sub_questions") or []:
            slot["sub"].append(len(prompts))
            prompts.append(prompt_text(tokenizer, dataclasses.replace(request, prompt=question)))
        slots.append(slot)
    outputs: list[Generation] = generate_batch(
        model,
        tokenizer,
        prompts,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.generation_batch_size,
    )
    return [
        {
            "prompt": outputs[s["prompt"]],
            "para": outputs[s["para"]] if "para" in s else None,
            "sub": [outputs[i] for i in s["sub"]],
        }
        for s in slots
    ]


def build_record(
    request: EditRequest,
    answer: Mapping[str, Any],
    config: BenchConfig,
    settings: str,
    scorer: RecordScorer,
    chunks: int | None,
    edit_seconds: float | None,
    generation_seconds: float,
    batch_len: int,
) -> dict[str, Any]:
    """The predictions-file record of one request (timings are per request of the edited batch)."""
    extra = request.extra
    original = scorer([answer["prompt"].text], [request.target])[0]
    paraphrase = scorer([answer["para"].text], [request.target])[0] if answer["para"] else None
    sub_answers = list(extra.get("sub_answers") or [])
    sub_rows = scorer([g.text for g in answer["sub"]], sub_answers)
    return {
        "id": extra.get("id"),
        "index": extra["index"],
        "benchmark": extra.get("benchmark", config.dataset),
        "dataset": config.dataset,
        "category": extra.get("category"),
        "method": config.method,
        "anyedit": bool(config.anyedit) and config.method != "none",
        "label": method_label(config.method, config.anyedit),
        "model": config.model,
        "preset": config.preset,
        "settings": settings,
        "sequential": config.sequential,
        "prompt": request.prompt,
        "target": request.target,
        "prediction": answer["prompt"].text,
        "stopped": answer["prompt"].stopped,
        "para_prompt": extra.get("para_prompt"),
        "para_prediction": answer["para"].text if answer["para"] else None,
        "para_stopped": answer["para"].stopped if answer["para"] else None,
        "sub_questions": list(extra.get("sub_questions") or []),
        "sub_answers": sub_answers,
        "sub_predictions": [g.text for g in answer["sub"]],
        "sub_stopped": [g.stopped for g in answer["sub"]],
        "metrics": {
            "original": original,
            "paraphrase": paraphrase,
            "sub": mean_scores(sub_rows) if sub_rows else None,
            "sub_items": sub_rows,
        },
        "seconds_edit": None if edit_seconds is None else edit_seconds / batch_len,
        "seconds_generation": generation_seconds / batch_len,
        "edit_batch_size": batch_len,
        "chunks": chunks,
    }


def faithful_record(
    request: EditRequest, answer: Mapping[str, Any], measured: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """One record's faithfulness scores: the probe's plus the fluency of its own answers and sub-fact hits.

    ``degenerate``/``repetition`` pool the edited prompt's answer, the paraphrase's and the regenerated
    everyday prompts'; ``locality_degenerate`` is the everyday prompts' alone.
    """
    if measured is None:
        return None
    row = {k: v for k, v in measured.items() if k not in ("locality_samples", "locality_fluency")}
    own = [answer["prompt"].text] + ([answer["para"].text] if answer.get("para") else [])
    samples = [s["after"] for s in measured.get("locality_samples", [])]
    fluency = Fluency(sync_on_compute=False)  # one record's score: never averaged across DDP ranks
    fluency.update(own + samples)
    scores = fluency.compute()
    row["degenerate"], row["repetition"] = float(scores["degenerate"]), float(scores["repetition"])
    row["locality_degenerate"] = (measured.get("locality_fluency") or {}).get("degenerate")
    sub_answers = list(request.extra.get("sub_answers") or [])
    subs = [g.text for g in answer.get("sub") or []]
    row["subfact_hits"] = None
    if subs and len(subs) == len(sub_answers):
        hits = SubFactHits(sync_on_compute=False)
        hits.update(subs, sub_answers)
        row["subfact_hits"] = float(hits.compute())
    return row
