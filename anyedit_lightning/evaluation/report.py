"""Benchmark reports: ``summary.json``, a Markdown table in the paper's layout, and a PNG bar chart.

Rows are methods (the unedited model first), one table per dataset; columns are grouped Original /
Paraphrase / Sub-questions with character BLEU, ROUGE-1/2/L recall and MiniLM similarity (×100, as the
paper prints them), then seconds per edit and the share of answers that ended before ``max_new_tokens``.
Rows from earlier runs into the same folder are kept (a row is replaced by a newer one for the same
method, AnyEdit flag and dataset), so separate ``bench`` runs build one combined table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..storage.integrity import atomic_write_text, finite_json

SUMMARY = "summary.json"
TABLE = "results.md"
PLOT = "results.png"

METHOD_ORDER = ("none", "memit", "alphaedit", "unke")
GROUP_TITLES = {"original": "Original", "paraphrase": "Paraphrase", "sub": "Sub"}
COLUMNS = (
    ("char_bleu", "BLEU (char)"),
    ("rouge1", "ROUGE-1"),
    ("rouge2", "ROUGE-2"),
    ("rougeL", "ROUGE-L"),
    ("similarity", "Similarity"),
)


FAITHFUL_COLUMNS = (
    ("locality_agreement", "Locality agr.", "pct"),
    ("locality_kl", "Locality KL", "kl"),
    ("cross_agreement", "Other-bench agr.", "pct"),
    ("cross_kl", "Other-bench KL", "kl"),
    ("neighbourhood_agreement", "Neighbour agr.", "pct"),
    ("neighbourhood_kl", "Neighbour KL", "kl"),
    ("degenerate", "Degenerate %", "pct"),
    ("perplexity_ratio", "PPL ratio", "ratio"),
    ("subfact_hits", "Sub-fact hits", "pct"),
)


def _faithful_cell(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return _pct(value) if kind == "pct" else f"{value:.4f}" if kind == "kl" else f"{value:.3f}"


def faithfulness_table(dataset: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: efficacy next to what the edit did elsewhere (empty when nothing was measured)."""
    if not any(r.get("faithfulness") for r in rows):
        return []
    header = ["Method", "Efficacy ROUGE-L", "Para ROUGE-L", *(name for _, name, _ in FAITHFUL_COLUMNS)]
    header += ["stopped %", "s/edit", "s/measure"]
    lines = [f"### {dataset}: faithfulness", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        f = row.get("faithfulness") or {}
        cells = [
            str(row.get("label", row["method"])),
            _pct((row.get("original") or {}).get("rougeL")),
            _pct((row.get("paraphrase") or {}).get("rougeL")),
        ]
        cells += [_faithful_cell(f.get(key), kind) for key, _, kind in FAITHFUL_COLUMNS]
        seconds, measure = row.get("seconds_per_edit"), f.get("seconds")
        cells += [
            _pct(row.get("stopped")),
            "–" if seconds is None else f"{seconds:.2f}",
            "–" if measure is None else f"{measure:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def row_key(row: Mapping[str, Any]) -> tuple[str, bool, str]:
    return str(row["method"]), bool(row["anyedit"]), str(row["dataset"])


def _order(row: Mapping[str, Any]) -> tuple:
    method = row["method"]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, method, bool(row["anyedit"])


def merge_rows(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``old`` rows updated by ``new`` ones (same key: replaced), ordered by dataset then paper order."""
    merged: dict[tuple, dict[str, Any]] = {row_key(r): dict(r) for r in old}
    for row in new:
        if row:  # a non-zero rank returns {}
            merged[row_key(row)] = dict(row)
    datasets: list[str] = []
    for row in [*old, *new]:
        if row and row["dataset"] not in datasets:
            datasets.append(row["dataset"])
    return sorted(merged.values(), key=lambda r: (datasets.index(r["dataset"]), *_order(r)))


def _pct(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _groups_present(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [g for g in GROUP_TITLES if any(r.get(g) for r in rows)]


def markdown_table(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> str:
    """The paper-style tables (one per dataset), with a per-category table where categories exist."""
    lines: list[str] = [f"# {title}", ""] if title else []
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for dataset in datasets:
        subset = [r for r in rows if r["dataset"] == dataset]
        groups = _groups_present(subset) or ["original"]
        n = max((r.get("n") or 0) for r in subset)
        lines += [f"## {dataset} ({n} requests)", ""]
        header = ["Method"]
        for group in groups:
            header += [f"{GROUP_TITLES[group]} {name}" for _, name in COLUMNS]
        header += ["s/edit", "stopped %"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in subset:
            cells = [str(row.get("label", row["method"]))]
            for group in groups:
                scores = row.get(group) or {}
                cells += [_pct(scores.get(key)) for key, _ in COLUMNS]
            seconds = row.get("seconds_per_edit")
            cells.append("–" if seconds is None else f"{seconds:.2f}")
            cells.append(_pct(row.get("stopped")))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += faithfulness_table(dataset, subset)
        categories = sorted({c for r in subset for c in (r.get("categories") or {})})
        if categories:
            lines += [f"### {dataset} by category (Original ROUGE-L / Similarity)", ""]
            lines.append("| Method | " + " | ".join(categories) + " |")
            lines.append("|:---|" + "|".join(["---:"] * len(categories)) + "|")
            for row in subset:
                cells = [str(row.get("label", row["method"]))]
                for category in categories:
                    original = ((row.get("categories") or {}).get(category) or {}).get("original") or {}
                    cells.append(f"{_pct(original.get('rougeL'))} / {_pct(original.get('similarity'))}")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    lines += [
        "Scores ×100, averaged over requests. BLEU (char) is NLTK's `sentence_bleu([answer], prediction)` on "
        "raw strings, i.e. a character-level BLEU-4 as in the paper; ROUGE-1/2/L are recall (the `rouge` "
        "package's `r`); Similarity is the cosine of all-MiniLM-L6-v2 embeddings. Sub: the same scores "
        "against each sub-answer, averaged per request. s/edit: wall seconds per edit (– for the unedited "
        "model). stopped %: answers that ended with the end-of-turn token before `max_new_tokens`.",
        "",
        "Faithfulness (docs/faithful.md): top-1 agreement and KL(unedited ‖ edited) per token, teacher-forced "
        "on the unedited model's answers to everyday prompts (Locality), to another benchmark's questions "
        "(Other-bench) and to the 8 MiniLM-nearest questions (Neighbour); Degenerate %: answers whose "
        "repeated-4-gram share exceeds 0.5 (edited prompt, paraphrase, regenerated everyday prompts); PPL "
        "ratio: held-out Wikipedia perplexity after/before; Sub-fact hits: sub-answers whose content words "
        "appear (at least half); s/measure: seconds of these measurements per record.",
        "",
    ]
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Grouped bars of Original ROUGE-L and similarity per method, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows)) or ["(no results)"]
    faithful = any(r.get("faithfulness") for r in rows)
    fig, axes = plt.subplots(
        2 if faithful else 1,
        len(datasets),
        figsize=(max(5.0, 4.5 * len(datasets)), 8.4 if faithful else 4.2),
        squeeze=False,
    )
    metrics = (("rougeL", "ROUGE-L"), ("similarity", "Similarity"))
    width = 0.38
    for ax, dataset in zip(axes[0], datasets):
        subset = [r for r in rows if r["dataset"] == dataset]
        labels = [str(r.get("label", r["method"])) for r in subset]
        for k, (key, name) in enumerate(metrics):
            values = [100 * (((r.get("original") or {}).get(key)) or 0.0) for r in subset]
            positions = [i + (k - 0.5) * width for i in range(len(subset))]
            ax.bar(positions, values, width, label=name)
        ax.set_xticks(range(len(subset)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(dataset)
        ax.set_ylabel("score ×100 (original prompt)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if faithful:
        _plot_faithfulness(axes[1], rows, datasets)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_faithfulness(axes, rows: Sequence[Mapping[str, Any]], datasets: Sequence[str]) -> None:
    """Second row: efficacy next to locality/neighbourhood agreement and the non-degenerate share."""
    bars = (
        ("efficacy", "Efficacy ROUGE-L"),
        ("locality_agreement", "Locality agr."),
        ("neighbourhood_agreement", "Neighbour agr."),
        ("fluent", "Not degenerate"),
    )
    width = 0.8 / len(bars)
    for ax, dataset in zip(axes, datasets):
        subset = [r for r in rows if r["dataset"] == dataset]
        for k, (key, name) in enumerate(bars):
            values = []
            for r in subset:
                f = r.get("faithfulness") or {}
                value = {
                    "efficacy": (r.get("original") or {}).get("rougeL"),
                    "fluent": None if f.get("degenerate") is None else 1 - f["degenerate"],
                }.get(key, f.get(key))
                values.append(100 * (value or 0.0))
            positions = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(subset))]
            ax.bar(positions, values, width, label=name)
        ax.set_xticks(range(len(subset)))
        labels = [str(r.get("label", r["method"])) for r in subset]
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(f"{dataset}: faithfulness")
        ax.set_ylabel("×100")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)


def write_report(
    out: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    merge: bool = True,
    title: str = "AnyEdit benchmark results",
) -> dict[str, Any]:
    """Write ``summary.json``, ``results.md`` and ``results.png`` under ``out``; returns the summary.

    With ``merge`` the rows already in ``out/summary.json`` are kept unless replaced by a new row.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old: list[dict[str, Any]] = []
    if merge and (out / SUMMARY).is_file():
        try:
            old = list(json.loads((out / SUMMARY).read_text(encoding="utf-8")).get("results", []))
        except (json.JSONDecodeError, AttributeError):
            old = []
    rows = merge_rows(old, rows)
    summary = {
        "results": finite_json(rows),
        "files": {"table": TABLE, "plot": PLOT, "predictions": "predictions.jsonl"},
    }
    atomic_write_text(
        out / SUMMARY, json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    )
    atomic_write_text(out / TABLE, markdown_table(rows, title))
    plot(rows, out / PLOT)
    return summary
