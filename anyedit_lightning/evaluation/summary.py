"""Means over a run's records: the summary row of one method on one benchmark (docs/algorithm.md §6)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

METRIC_KEYS = ("char_bleu", "word_bleu", "rouge1", "rouge2", "rougeL", "similarity")
GROUPS = ("original", "paraphrase", "sub")


def mean_of(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None or NaN (None when none are)."""
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else None


FAITHFUL_KEYS = (
    "locality_agreement",
    "locality_kl",
    "cross_agreement",
    "cross_kl",
    "neighbourhood_agreement",
    "neighbourhood_kl",
    "degenerate",
    "repetition",
    "locality_degenerate",
    "perplexity_ratio",
    "subfact_hits",
    "seconds",
)


def mean_scores(rows: Sequence[Mapping[str, float]]) -> dict[str, float | None]:
    """Per metric key, the mean over ``rows`` (a request's sub-questions, or a run's requests)."""
    keys = [k for k in METRIC_KEYS if any(k in row for row in rows)]
    return {k: mean_of(row.get(k) for row in rows) for k in keys}


def summarize(records: Sequence[Mapping[str, Any]], by_category: bool = True) -> dict[str, Any]:
    """Means over ``records`` (one method, one benchmark): scores per group, s/edit, stopped fraction, categories."""
    summary: dict[str, Any] = {"n": len(records)}
    for group in GROUPS:
        rows = [r["metrics"][group] for r in records if r.get("metrics", {}).get(group)]
        summary[group] = mean_scores(rows) if rows else None
        summary[f"n_{group}"] = len(rows)
    summary["seconds_per_edit"] = mean_of(r.get("seconds_edit") for r in records)
    summary["seconds_generation"] = mean_of(r.get("seconds_generation") for r in records)
    summary["stopped"] = mean_of(float(r["stopped"]) for r in records if "stopped" in r)
    summary["chunks"] = mean_of(r.get("chunks") for r in records)
    faithful = [r["faithfulness"] for r in records if r.get("faithfulness")]
    summary["faithfulness"] = (
        {key: mean_of(f.get(key) for f in faithful) for key in FAITHFUL_KEYS} if faithful else None
    )
    categories = sorted({str(r["category"]) for r in records if r.get("category") is not None})
    if by_category and categories:
        summary["categories"] = {
            c: summarize([r for r in records if str(r.get("category")) == c], by_category=False)
            for c in categories
        }
    return summary
