"""The prompts an edit should leave alone: everyday prompts, other benchmarks' questions, near neighbours.

* ``locality_prompts()``: ``data/locality_prompts.json``, everyday prompts across domains (set a);
* ``cross_benchmark_questions(benchmark)``: questions of *another* benchmark's records (set b): MQuAKE-CF
  for UnKEBench edits, UnKEBench for every other benchmark; an evenly spaced, fixed selection of records
  from position ``POOL_START`` on, outside the dev (0-19) and test (20-49) records;
* ``nearest_prompts(query, pool, k)``: the ``k`` pool prompts closest to an edited prompt by MiniLM
  cosine, the neighbourhood (rule and justification in ``docs/faithful.md``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..storage.paths import default_data_dir

LOCALITY_FILE = "locality_prompts.json"
POOL_START = 50
CROSS_QUESTIONS = 24
NEIGHBOURS = 8


@dataclass(frozen=True)
class LocalityPrompt:
    prompt: str
    domain: str


def locality_prompts(path: str | Path | None = None) -> list[LocalityPrompt]:
    """Set (a), in file order (round-robin over domains, so any prefix covers every domain)."""
    path = Path(path) if path is not None else default_data_dir() / LOCALITY_FILE
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [LocalityPrompt(item["prompt"], item["domain"]) for item in data["prompts"]]


@functools.lru_cache(maxsize=8)
def benchmark_questions(benchmark: str, start: int = POOL_START) -> tuple[tuple[int, str], ...]:
    """``(index, question)`` of a benchmark's records from ``start`` on (bad records skipped); empty if
    the benchmark's file is missing."""
    import warnings

    from ..benchmarks import get_datamodule

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = get_datamodule(benchmark, start=start, skip_invalid=True)
            records = module.records
    except (FileNotFoundError, ValueError):
        return ()
    return tuple((r.index, r.prompt) for r in records)


def other_benchmark(benchmark: str) -> str:
    """The benchmark whose questions serve as set (b): MQuAKE-CF for UnKEBench, else UnKEBench."""
    return "mquake_cf" if benchmark.lower() == "unkebench" else "unkebench"


def cross_benchmark_questions(benchmark: str, n: int = CROSS_QUESTIONS) -> list[str]:
    """``n`` evenly spaced questions of the other benchmark's records >= ``POOL_START`` (fixed selection)."""
    questions = benchmark_questions(other_benchmark(benchmark))
    if n <= 0 or not questions:
        return []
    step = max(1, len(questions) // n)
    return [q for _, q in questions[::step][:n]]


def neighbourhood_pool(benchmark: str | None) -> list[str]:
    """The benchmark's questions >= ``POOL_START`` plus set (a), deduplicated (the edited prompt itself is
    dropped by :func:`nearest_prompts`)."""
    pool = [q for _, q in (benchmark_questions(benchmark) if benchmark else ())]
    pool += [p.prompt for p in locality_prompts()]
    return list(dict.fromkeys(pool))


@functools.lru_cache(maxsize=4)
def _pool_embeddings(texts: tuple[str, ...], model_path: str | None) -> torch.Tensor:
    from ..metrics.similarity import load_encoder

    return load_encoder(model_path).encode(list(texts))


def nearest_prompts(
    query: str, pool: Sequence[str], k: int = NEIGHBOURS, model_path: str | None = None
) -> list[str]:
    """The ``k`` pool prompts with the highest MiniLM cosine to ``query``, never ``query`` itself (ties:
    pool order). The pool's embeddings are computed once per process."""
    from ..metrics.similarity import load_encoder

    pool = list(pool)
    if k <= 0 or not pool:
        return []
    scores = (
        _pool_embeddings(tuple(pool), model_path) @ load_encoder(model_path).encode([query])[0]
    ).tolist()
    keep = [i for i, p in enumerate(pool) if p.strip() != query.strip()]
    keep.sort(key=lambda i: (-round(scores[i], 6), i))
    return [pool[i] for i in keep[:k]]
