"""Benchmarking edits (ALGORITHM.md §6): batched greedy generation, the resumable Lightning loop, reports."""

from .generation import Generation, generate_batch
from .report import markdown_table, write_report
from .runner import BenchConfig, BenchmarkModule, GridConfig, run_benchmark, run_grid, summarize

__all__ = [
    "BenchConfig",
    "BenchmarkModule",
    "Generation",
    "GridConfig",
    "generate_batch",
    "markdown_table",
    "run_benchmark",
    "run_grid",
    "summarize",
    "write_report",
]
