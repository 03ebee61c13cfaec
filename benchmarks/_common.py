"""Shared bits of the benchmark scripts: requests of a chosen length and timing an edit."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from anyedit_lightning import EditRequest, edit
from anyedit_lightning.core.requests import prompt_text
from anyedit_lightning.evaluation import generate_batch
from anyedit_lightning.metrics import rouge_l_recall

ROOT = Path(__file__).resolve().parents[1]


def dev_requests(count: int, min_tokens: int, tokenizer) -> list[EditRequest]:
    """EditEverything dev records (first 20) cut to about ``min_tokens`` tokens at a sentence end."""
    return requests_of_length(count, min_tokens, tokenizer, range(20))


def requests_of_length(count: int, min_tokens: int, tokenizer, positions: range) -> list[EditRequest]:
    """The first ``count`` EditEverything records at ``positions`` (dev: 0-19, test: from 20) whose answer
    has at least ``min_tokens`` tokens, cut to about that many at a sentence end."""
    records = json.loads((ROOT / "data" / "editevery.json").read_text())
    out: list[EditRequest] = []
    for position in positions:
        if len(out) == count or position >= len(records):
            break
        record = records[position]
        ids = tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
        if len(ids) < min_tokens:
            continue
        text = tokenizer.decode(ids[:min_tokens])
        cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind("\n"))
        # End on a sentence or line when that keeps most of the text, else at the token budget.
        out.append(
            EditRequest(
                record["question"],
                text[: cut + 1].strip() if cut > 0.8 * len(text) else text,
                extra={"index": position, "benchmark": "editeverything"},
            )
        )
    return out


def generate(model, tokenizer, request: EditRequest, max_new_tokens: int) -> tuple[str, bool]:
    """The greedy answer to ``request.prompt`` and whether the model ended it itself."""
    answer = generate_batch(model, tokenizer, [prompt_text(tokenizer, request)], max_new_tokens)[0]
    return answer.text.strip(), answer.stopped


def timed_edit(model, tokenizer, request, **kwargs):
    """Edit, then regenerate; returns seconds, ROUGE-L recall, whether it stopped, and the module."""
    started = time.perf_counter()
    module = edit(
        model, tokenizer, request, trainer_kwargs=dict(enable_progress_bar=False, logger=False), **kwargs
    )
    seconds = time.perf_counter() - started
    n = len(tokenizer(request.target)["input_ids"])
    prediction, stopped = generate(model, tokenizer, request, n + 40)
    return seconds, rouge_l_recall(prediction, request.target), stopped, module


class RssPeak:
    """Peak resident memory while a block runs (sampled every 20 ms from /proc), in MB."""

    def __enter__(self) -> RssPeak:
        import threading

        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, _rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # not Linux: fall back to the process-wide peak
        return peak_rss_mb()


def fictional_requests() -> list[EditRequest]:
    """The three fictional long-form edits of the end-to-end test (data/fictional_edits.json)."""
    records = json.loads((ROOT / "data" / "fictional_edits.json").read_text(encoding="utf-8"))["records"]
    return [EditRequest(r["prompt"], r["target"]) for r in records]


class WriteClock:
    """Seconds spent in the weight write (the writer callback's ``on_train_end``) of each edit in the block."""

    def __enter__(self) -> WriteClock:
        from anyedit_lightning.writers.base import WeightWriter

        self.seconds: list[float] = []
        self._writer_class, self._original = WeightWriter, WeightWriter.on_train_end
        original, clock = self._original, self

        def timed_write(writer, trainer, pl_module) -> None:
            started = time.perf_counter()
            try:
                original(writer, trainer, pl_module)
            finally:
                clock.seconds.append(time.perf_counter() - started)

        WeightWriter.on_train_end = timed_write
        return self

    def __exit__(self, *exc) -> None:
        self._writer_class.on_train_end = self._original


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
