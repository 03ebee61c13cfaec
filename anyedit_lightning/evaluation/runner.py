"""Benchmark entry points (docs/algorithm.md §6): :func:`run_benchmark` and :func:`run_grid`.

For each request of a benchmark the model is edited (the core :func:`anyedit_lightning.api.edit`),
answers greedily to the prompt, the paraphrase and every sub-question, the answers are scored, and the
touched weights are restored bit-exactly (or kept with ``sequential=True``). Every record is appended to
a predictions JSONL file as soon as it is scored, so a killed run keeps what it did; a rerun into the
same folder skips the requests already there (same method, AnyEdit flag, benchmark and record index).

The parts live in their own modules: settings in :mod:`.config`, the predictions file in :mod:`.store`,
a record's answers and scores in :mod:`.scoring`, the means in :mod:`.summary`, the loop over records
(and why it is one, with Lightning Fabric for several processes) in :mod:`.loop`. Their public names
are importable from here as well.

Example:
    >>> summary = run_benchmark(BenchConfig(method="memit", anyedit=True, dataset="unkebench",
    ...                                     start=20, limit=30, out="results/memit-anyedit"))
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from ..benchmarks import get_datamodule
from ..presets import get_preset
from ..stats.covariance import CovarianceStats, compute_covariance
from .config import (
    COVARIANCE_METHODS,
    METHOD_LABELS,
    METHODS,
    BenchConfig,
    GridConfig,
    Method,
    RunOptions,
    Split,
    edit_layers,
    method_label,
    resolve_preset,
    resolved,
    settings_hash,
)
from .loop import BenchmarkLoop
from .scoring import RecordScorer, build_record, faithful_record, generate_answers
from .store import PREDICTIONS, PredictionWriter, merge_rank_files, prediction_files, read_records, record_key
from .summary import FAITHFUL_KEYS, GROUPS, METRIC_KEYS, mean_of, mean_scores, summarize

__all__ = [
    "COVARIANCE_METHODS",
    "FAITHFUL_KEYS",
    "GROUPS",
    "METHODS",
    "METHOD_LABELS",
    "METRIC_KEYS",
    "PREDICTIONS",
    "BenchConfig",
    "BenchmarkLoop",
    "GridConfig",
    "Method",
    "PredictionWriter",
    "RecordScorer",
    "RunOptions",
    "Split",
    "build_record",
    "edit_layers",
    "faithful_record",
    "generate_answers",
    "load_for",
    "make_fabric",
    "mean_of",
    "mean_scores",
    "merge_rank_files",
    "method_label",
    "prediction_files",
    "read_records",
    "record_key",
    "resolve_preset",
    "resolved",
    "run_benchmark",
    "run_grid",
    "selected_data",
    "settings_hash",
    "stats_for",
    "summarize",
]

log = logging.getLogger(__name__)


def _default_device(config: RunOptions) -> str:
    if config.device:
        return config.device
    if config.distributed:
        return "cpu"  # each process loads its copy here; Lightning moves it to that process's device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for(config: RunOptions):
    """The model and tokenizer a config names (see :func:`anyedit_lightning.models.loading.load_model`)."""
    from ..models.loading import load_model

    return load_model(config.model, dtype=config.dtype, device=_default_device(config))


def stats_for(
    model: torch.nn.Module, tokenizer, configs: Sequence[BenchConfig], **kwargs: Any
) -> CovarianceStats | None:
    """Covariance statistics of the unedited model for every layer the MEMIT/AlphaEdit runs edit (or None)."""
    needing = [c for c in map(resolved, configs) if c.method in COVARIANCE_METHODS]
    if not needing:
        return None
    layers = sorted({layer for c in needing for layer in edit_layers(c)})
    preset = get_preset(needing[0].preset)
    tokens = needing[0].stats_tokens or preset.stats_tokens
    corpora = {get_preset(c.preset).stats_corpus(c.method) for c in needing}
    if len(corpora) > 1:
        raise ValueError(
            f"These runs' presets use different statistics corpora {sorted(corpora)}; run them separately."
        )
    kwargs.setdefault("corpus", corpora.pop())
    device = next(model.parameters()).device
    stats = compute_covariance(model, tokenizer, layers, max_tokens=tokens, **kwargs)
    if next(model.parameters()).device != device:  # Lightning's teardown moves a tested module to the CPU
        model.to(device)
    return stats


def make_fabric(model: torch.nn.Module, config: RunOptions | None = None) -> L.Fabric:
    """The run's processes and precision: one process on the model's device, or ``config``'s
    accelerator/devices/nodes/strategy (``ddp``: the command is started again once per extra process)."""
    config = config or RunOptions()
    strategy = config.strategy or ("ddp" if config.distributed else "auto")
    device = next(model.parameters()).device
    if config.distributed:
        placement = dict(devices=config.devices, num_nodes=config.num_nodes)
    else:
        placement = dict(devices=[device.index] if device.index is not None else 1)
    return L.Fabric(
        accelerator=config.accelerator or device.type,
        strategy=strategy,
        precision=config.precision,
        **placement,
    )


def selected_data(config: BenchConfig):
    """The run's data module, set up; raises when ``start``/``limit``/``split`` select no records."""
    datamodule = get_datamodule(
        config.dataset,
        start=config.start,
        limit=config.limit,
        split=config.split,
        batch_size=config.batch_size,
    )
    datamodule.setup("predict")
    return datamodule


def run_benchmark(
    config: BenchConfig,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    stats: CovarianceStats | None = None,
    fabric: L.Fabric | None = None,
    report: bool = True,
    keep_edits: bool = False,
) -> dict[str, Any]:
    """Run one benchmark configuration and return its summary row (see :func:`summarize`).

    ``model``/``tokenizer``/``stats`` may be given prebuilt (notebooks, tests, grids); otherwise the model
    is loaded from ``config.model`` and the statistics computed once for the edited layers. ``fabric``
    (default: :func:`make_fabric`) places the run; it is launched here. With ``report`` the row is merged
    into ``<out>/summary.json`` and the Markdown table and plot are redrawn. A sequential run restores the
    starting weights at its end unless ``keep_edits``. Ranks other than 0 return ``{}``.
    """
    config = resolved(config)
    L.seed_everything(config.seed, verbose=False)
    datamodule = selected_data(config)  # before loading anything: zero records is an error
    if model is None or tokenizer is None:
        model, tokenizer = load_for(config)
    device = next(model.parameters()).device
    if stats is None:
        stats = stats_for(model, tokenizer, [config])
    loop = BenchmarkLoop(model, tokenizer, config, stats, keep_edits=keep_edits)
    fabric = fabric or make_fabric(model, config)
    fabric.launch()
    started = time.perf_counter()
    try:
        loop.run(datamodule.requests, fabric)
    finally:
        if next(model.parameters()).device != device:
            model.to(device)
    wall = time.perf_counter() - started
    if not fabric.is_global_zero:
        return {}
    wanted = {loop.key(r) for r in datamodule.requests}
    records = [r for r in read_records(prediction_files(config.out)) if record_key(r) in wanted]
    records.sort(key=lambda r: r["index"])
    benchmark = records[0]["benchmark"] if records else config.dataset
    row = {
        "label": method_label(config.method, config.anyedit),
        "method": config.method,
        "anyedit": bool(config.anyedit) and config.method != "none",
        "dataset": benchmark,
        **summarize(records),
        "edits_performed": loop.edits_performed,
        "wall_seconds": wall,
        "config": dataclasses.asdict(config),
    }
    if report:
        from .report import write_report

        write_report(config.out, [row])
    return row


def run_grid(
    config: GridConfig,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    stats: CovarianceStats | None = None,
) -> dict[str, Any]:
    """Every run of ``config.runs()`` into ``config.out``; one combined summary, table and plot."""
    runs = [resolved(run) for run in config.runs()]
    for run in runs:
        selected_data(run)  # every dataset's selection is checked before the model loads
    if model is None or tokenizer is None:
        model, tokenizer = load_for(config)
    if stats is None:
        stats = stats_for(model, tokenizer, runs)
    started = time.perf_counter()
    rows = []
    for run in runs:
        log.info("Grid: %s on %s", method_label(run.method, run.anyedit), run.dataset)
        rows.append(run_benchmark(run, model, tokenizer, stats, report=False))
    if not all(rows):  # a rank other than 0: rank 0 writes the report
        return {"results": []}
    from .report import write_report

    summary = write_report(config.out, rows)
    summary["grid_wall_seconds"] = time.perf_counter() - started
    return summary
