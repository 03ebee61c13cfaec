"""Benchmarking edits (docs/algorithm.md §6): batched greedy generation, the resumable loop, reports."""

from .edit_report import EditReport, edit_report
from .faithfulness import FaithfulnessOptions, FaithfulnessProbe
from .generation import Generation, generate_batch
from .report import markdown_table, write_report
from .retention import RetentionConfig, run_retention
from .runner import BenchConfig, BenchmarkLoop, GridConfig, run_benchmark, run_grid, summarize

__all__ = [
    "BenchConfig",
    "BenchmarkLoop",
    "EditReport",
    "FaithfulnessOptions",
    "FaithfulnessProbe",
    "Generation",
    "GridConfig",
    "RetentionConfig",
    "edit_report",
    "generate_batch",
    "markdown_table",
    "run_benchmark",
    "run_grid",
    "run_retention",
    "summarize",
    "write_report",
]
