"""The retention benchmark: do many kept edits all still work? (docs/algorithm.md §4.6,
docs/results/retention.md)

``sequential``: the records are edited one after another into one model (``batch_size`` requests per
edit, each edit kept), and after each checkpoint every edited prompt so far is answered again.
``batch``: all records in one edit. Each checkpoint scores the mean ROUGE-L recall of all edits so far,
the share of those answers that stop, the ROUGE-L of the first ten edits, locality agreement and KL on
everyday prompts and on another benchmark's questions, the held-out perplexity ratio, and the seconds of
the last edit (and of each edit so far). Rows go to ``<out>/retention.jsonl`` as they come;
``retention.md`` and ``retention.png`` are redrawn after each.

    python -m anyedit_lightning retention --dataset unkebench --start 20 --limit 30 --out results/retention
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..api import edit, edit_sequentially
from ..core.requests import EditRequest, prompt_text
from ..metrics.rouge import rouge_l_recall
from ..patches.patch import apply_patches, load_patches
from .config import BenchConfig, resolved
from .faithfulness import FaithfulnessProbe
from .generation import generate_batch
from .runner import load_for, selected_data, stats_for

FIRST = 10  # the "first edits" column: how the earliest edits hold up as more arrive


@dataclass
class RetentionConfig(BenchConfig):
    """A retention run (see the module docstring); the other options are ``bench``'s. It runs in one
    process on the model's device; ``sequential``, ``similarity``, ``neighbours``, ``fluency_prompts``,
    ``precision`` and the multi-process options do not apply.

    Attributes:
        mode: ``sequential`` (one edit per ``batch_size`` records, each kept) or ``batch`` (one edit).
        checkpoints: edit counts after which everything is measured (None: after every edit).
        patch_dir: save each edit's patch there as it is made (sequential mode), for ``resume_from``.
        resume_from: the ``patch_dir`` of an earlier run on the same records: its first ``resume_edits``
            patches (None: all) are applied to the unedited model, after its reference answers are
            taken, and editing continues with the next record, as if the run had never stopped.
    """

    mode: Literal["sequential", "batch"] = "sequential"
    checkpoints: list[int] | None = None
    out: str = "results/retention"
    patch_dir: str | None = None
    resume_from: str | None = None
    resume_edits: int | None = None


def answer_scores(model, tokenizer, requests: list[EditRequest], config: BenchConfig) -> dict[str, Any]:
    """Every request's prompt answered again: ROUGE-L recall against its target, and whether it stops."""
    answers = generate_batch(
        model,
        tokenizer,
        [prompt_text(tokenizer, r) for r in requests],
        max_new_tokens=config.max_new_tokens,
        batch_size=config.generation_batch_size,
    )
    scores = [rouge_l_recall(a.text, r.target) for a, r in zip(answers, requests)]
    return {
        "rouge_l": sum(scores) / len(scores),
        "rouge_l_first": sum(scores[:FIRST]) / len(scores[:FIRST]),
        "stopped": sum(a.stopped for a in answers) / len(answers),
        "per_edit": scores,
    }


def run_retention(config: RetentionConfig, model=None, tokenizer=None) -> list[dict[str, Any]]:
    """Run ``config`` and return its rows, one per checkpoint (also written under ``config.out``)."""
    config = resolved(config)
    if config.method == "none":
        raise ValueError("retention needs an editing method (memit, alphaedit or unke), not 'none'.")
    if config.distributed:
        raise ValueError("retention keeps every edit in one model: run it as one process (devices=1).")
    if config.mode == "batch" and (config.patch_dir or config.resume_from):
        raise ValueError("patch_dir and resume_from are for sequential runs; a batch run is one edit.")
    if config.resume_edits is not None and not config.resume_from:
        raise ValueError("resume_edits needs resume_from, the patch_dir of the run to continue.")
    requests = selected_data(config).requests
    if model is None or tokenizer is None:
        model, tokenizer = load_for(config)
    stats = stats_for(model, tokenizer, [config])
    probe = None
    if config.faithfulness:
        options = config.faithfulness_options(neighbours=0, fluency_prompts=0)
        probe = FaithfulnessProbe(model, tokenizer, config.dataset, options).prepare()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retention.jsonl").write_text("")
    rows: list[dict[str, Any]] = []
    kwargs = dict(
        method=config.method,
        anyedit=config.anyedit,
        stats=stats,
        preset=config.preset,
        writer_kwargs=dict(config.writer),
        trainer_kwargs=dict(enable_progress_bar=config.progress_bar, logger=False),
        **config.edit,
    )
    resumed = _resume(model, requests, config) if config.resume_from else 0
    clock, seconds = {"last": time.perf_counter()}, [None] * resumed

    def measure(done: int, timed: bool = True) -> None:
        if timed:
            seconds.append(round(time.perf_counter() - clock["last"], 2))
        if config.checkpoints is None or done in config.checkpoints or done == len(requests):
            row = {"edits": done, "mode": config.mode, "edit_seconds": seconds[-1]}
            row["seconds_per_edit"] = list(seconds)  # every edit so far, checkpoints or not
            with torch.no_grad():
                row.update(answer_scores(model, tokenizer, requests[:done], config))
                if probe is not None:
                    row.update({k: v for k, v in probe.measure_edit().items() if isinstance(v, float)})
            rows.append(row)
            with open(out / "retention.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")
            write_retention_report(out, rows, config)
        clock["last"] = time.perf_counter()

    if config.mode == "batch":
        edit(model, tokenizer, requests, **kwargs)
        measure(len(requests))
    else:
        if resumed:  # the state the earlier run saved, measured again: it should match that run's row
            measure(resumed, timed=False)
        size = config.batch_size
        if resumed < len(requests):
            edit_sequentially(
                model,
                tokenizer,
                requests[resumed:],
                callback=lambda i, _module: measure(min(len(requests), resumed + (i + 1) * size)),
                batch_size=size,
                patch_dir=config.patch_dir,
                **kwargs,
            )
    return rows


def _resume(model, requests: list[EditRequest], config: RetentionConfig) -> int:
    """Apply the saved patches of ``config.resume_from``, once checked to have edited the first records of
    this run in its batches; the number of records they cover."""
    patches = load_patches(config.resume_from, config.resume_edits)
    done = [(r["prompt"], r["target"]) for patch in patches for r in patch.requests]
    wanted = [(r.prompt, r.target) for r in requests[: len(done)]]
    if done != wanted or len(done) % config.batch_size:
        raise ValueError(
            f"The patches in {config.resume_from} edited {len(done)} requests that are not this run's first "
            f"{len(done)} records in batches of {config.batch_size}: resume with the dataset, split, start "
            "and batch_size of the run that saved them."
        )
    apply_patches(model, patches)
    return len(done)


COLUMNS = (
    ("edits", "Edits kept", "{}"),
    ("rouge_l", "Mean ROUGE-L of all", "{:.3f}"),
    ("rouge_l_first", f"First {FIRST}", "{:.3f}"),
    ("stopped", "Answers that stop", "{:.0%}"),
    ("locality_agreement", "Locality agr.", "{:.3f}"),
    ("cross_agreement", "Other benchmark agr.", "{:.3f}"),
    ("perplexity_ratio", "PPL ×", "{:.3f}"),
    ("edit_seconds", "s (last edit)", "{:.0f}"),
)


def write_retention_report(out: Path, rows: list[dict[str, Any]], config: RetentionConfig) -> None:
    """``retention.md`` (the table) and ``retention.png`` (the curve) under ``out``."""
    lines = [
        f"# Retention: {config.method}{'+AnyEdit' if config.anyedit else ''}, {config.mode}, "
        f"{config.dataset} records from {config.start}",
        "",
        "| " + " | ".join(name for _, name, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = ["–" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "retention.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    edits = [r["edits"] for r in rows]
    for key, name in (
        ("rouge_l", "mean ROUGE-L, all edits so far"),
        ("locality_agreement", "locality (everyday prompts)"),
        ("cross_agreement", "locality (other benchmark)"),
    ):
        if any(r.get(key) is not None for r in rows):
            ax.plot(edits, [r.get(key) for r in rows], marker="o", label=name)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("edits kept")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{config.method} {config.mode}: retention")
    fig.tight_layout()
    fig.savefig(out / "retention.png", dpi=110)
    plt.close(fig)
