"""The benchmark loop (docs/algorithm.md §6): edit → answer → score → restore, one batch at a time.

A plain loop over records rather than a ``LightningModule`` under ``Trainer.predict``: every edit is
already a ``Trainer.fit`` of an ``AnyEditModule`` (:func:`anyedit_lightning.api.edit`), and a predict
Trainer around it only nested a second Trainer, strategy and precision plugin around the first. What the
outer Trainer really gave, launching one process per device, the rank and world size, barriers, the
process's device and the precision context, is Lightning Fabric's job, so the loop takes a launched
:class:`~lightning.fabric.Fabric` (one process: a single-device Fabric, no process group). Each rank
takes every ``world_size``-th request not yet in the predictions files, writes its own rank file, and
rank 0 merges the rank files after a barrier.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tqdm.auto import tqdm

from .. import api
from ..core.module import AnyEditModule
from ..core.requests import EditRequest
from ..stats.covariance import CovarianceStats
from .config import BenchConfig, resolved, settings_hash
from .scoring import RecordScorer, build_record, faithful_record, generate_answers
from .store import PREDICTIONS, PredictionWriter, merge_rank_files, prediction_files, read_records, record_key

log = logging.getLogger(__name__)


class BenchmarkLoop:
    """Edit → generate → score → restore for each batch of a run's unfinished requests.

    Args:
        model, tokenizer: the model under test (edited in place, restored after each batch unless
            ``config.sequential``).
        config: the run's :class:`BenchConfig`.
        stats: covariance statistics of the unedited model, shared by every edit (MEMIT, AlphaEdit).
        keep_edits: with ``config.sequential``, leave the accumulated edits in the model after the run
            (default: restore the weights the run started from).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        config: BenchConfig,
        stats: CovarianceStats | None = None,
        keep_edits: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = resolved(config)
        self.stats = stats
        self.keep_edits = keep_edits
        self.out = Path(self.config.out)
        self.settings = settings_hash(self.config)
        self.done: set[tuple] = set()
        self.edits_performed = 0
        self.records_written = 0
        self._writer: PredictionWriter | None = None
        self._originals: dict[str, torch.Tensor] = {}  # sequential: first snapshot of each touched tensor
        self._probe = None
        self._scorer: RecordScorer | None = None

    def key(self, request: EditRequest) -> tuple[str, bool, str, int]:
        """The request's resume key (see :func:`~anyedit_lightning.evaluation.store.record_key`)."""
        return record_key(
            {
                "method": self.config.method,
                "anyedit": self.config.anyedit,
                "benchmark": request.extra.get("benchmark", self.config.dataset),
                "index": request.extra["index"],
            }
        )

    def run(self, requests: Sequence[EditRequest], fabric: L.Fabric) -> None:
        """Every request of ``requests`` not yet in the predictions files, this rank's share of them.

        ``fabric`` must be launched. The model goes to the rank's device and precision as a predict
        Trainer would put it (and stays there); the weights are restored bit-exactly after each batch.
        """
        self.model = fabric.strategy.precision.convert_module(self.model.to(fabric.device))
        self._resume()
        pending = [r for r in requests if self.key(r) not in self.done]
        if len(pending) < len(requests):
            log.info("Skipping %d request(s) already in %s", len(requests) - len(pending), self.out)
            if self.config.sequential:
                log.warning("Resuming a sequential run: the skipped requests' edits are not replayed.")
        share = pending[fabric.global_rank :: fabric.world_size]
        name = PREDICTIONS if fabric.world_size == 1 else f"predictions.rank{fabric.global_rank}.jsonl"
        self._writer = PredictionWriter(self.out / name)
        self._scorer = RecordScorer(self.config.similarity, fabric.device)
        was_training = self.model.training
        try:
            self.model.eval()
            # Every rank's probe gets all pending prompts: the same neighbourhoods as one process. It runs
            # outside the precision context, as the reference cached per weights fingerprint always has.
            self._probe = self._make_probe(pending) if self.config.faithfulness and pending else None
            size = self.config.batch_size
            starts = range(0, len(share), size)
            bar = tqdm(
                starts,
                desc="Requests",
                unit="batch",
                disable=not (self.config.progress_bar and fabric.is_global_zero),
            )
            with fabric.autocast():
                for start in bar:
                    self.run_batch(share[start : start + size])
        finally:
            if self.config.sequential and not self.keep_edits:
                self._restore(self._originals)
            self._originals = {}
            self.model.train(was_training)
        fabric.barrier()
        if fabric.is_global_zero:  # also folds in the rank files of an interrupted multi-process run
            merge_rank_files(self.out)
        fabric.barrier()

    def run_batch(self, batch: list[EditRequest]) -> list[dict[str, Any]]:
        """Edit, generate, score, restore and write the records of one batch; returns the records."""
        edit_seconds, chunks, before = None, [None] * len(batch), {}
        try:
            if self.config.method != "none":
                started = time.perf_counter()
                module = self._edit(batch)
                edit_seconds = time.perf_counter() - started
                self.edits_performed += 1
                before = module.edit_record.before
                chunks = [len(plan.chunks) for plan in module.plans]
            with torch.no_grad():
                started = time.perf_counter()
                answers = generate_answers(self.model, self.tokenizer, batch, self.config)
                generation_seconds = time.perf_counter() - started
                faithfulness = self._faithfulness(batch, before)
        finally:
            if self.config.sequential:
                for name, value in before.items():
                    self._originals.setdefault(name, value)
            else:
                self._restore(before)
        records = []
        for request, answer, n_chunks, faithful in zip(batch, answers, chunks, faithfulness):
            timings = (n_chunks, edit_seconds, generation_seconds, len(batch))
            record = build_record(request, answer, self.config, self.settings, self._scorer, *timings)
            record["faithfulness"] = faithful_record(request, answer, faithful)
            self._writer.write(record)
            records.append(record)
            self.done.add(self.key(request))
            self.records_written += 1
            o = record["metrics"]["original"]
            log.info(
                "%s %s #%s: ROUGE-L %.3f, BLEU %.3f, edit %s, stopped %s",
                record["label"],
                record["benchmark"],
                record["index"],
                o["rougeL"],
                o["char_bleu"],
                "-" if edit_seconds is None else f"{edit_seconds:.1f} s",
                record["stopped"],
            )
        return records

    def _resume(self) -> None:
        """The finished records' keys, with a warning when some were made with other settings."""
        existing = read_records(prediction_files(self.out))
        self.done = {record_key(r) for r in existing}
        others = {r.get("settings") for r in existing if r.get("method") == self.config.method}
        if others - {self.settings, None}:
            log.warning(
                "%s already holds records made with other settings; they are reused as they are. "
                "Use a new --out folder to rerun with the new settings.",
                self.out,
            )

    def _edit(self, requests: list[EditRequest]) -> AnyEditModule:
        """The one ``Trainer.fit`` of this batch's edit (:func:`anyedit_lightning.api.edit`)."""
        # the unedited model's statistics serve every edit: once edits are kept, the writers check them
        # against the weights before the first kept edit (the model's edit ledger)
        stats = self.stats
        with torch.inference_mode(False), torch.enable_grad():
            return api.edit(
                self.model,
                self.tokenizer,
                requests,
                method=self.config.method,
                anyedit=self.config.anyedit,
                preset=self.config.preset,
                stats=stats,
                trainer_kwargs=dict(enable_progress_bar=False, logger=False),
                writer_kwargs=dict(self.config.writer),
                **self.config.edit,
            )

    def _make_probe(self, pending: list[EditRequest]):
        """The unedited reference for this run, computed now (the weights are still the starting ones)."""
        from .faithfulness import FaithfulnessProbe

        c = self.config
        options = c.faithfulness_options()
        started = time.perf_counter()
        try:
            prompts = [r.prompt for r in pending]
            probe = FaithfulnessProbe(self.model, self.tokenizer, c.dataset, options).prepare(prompts)
        except FileNotFoundError as error:  # an installed package without the data/ folder
            log.warning("Faithfulness metrics are off: %s", error)
            return None
        log.info("Unedited faithfulness reference: %.1f s", time.perf_counter() - started)
        return probe

    def _faithfulness(self, requests: list[EditRequest], before: Mapping[str, torch.Tensor]) -> list:
        """Per request: the set-level scores of this edit plus its neighbourhood (None when switched off)."""
        if self._probe is None:
            return [None] * len(requests)
        started = time.perf_counter()
        unedited = {**before, **self._originals}  # sequential: each tensor's first snapshot is the start
        shared = self._probe.measure_edit(touched=unedited.keys())
        rows = [{**shared, **self._probe.measure_neighbourhood(r.prompt, unedited)} for r in requests]
        for row in rows:
            row["seconds"] = (time.perf_counter() - started) / len(requests)
        return rows

    def _restore(self, before: Mapping[str, torch.Tensor]) -> None:
        """Copy the snapshots back: the weights become bit-identical to what they were before the edit."""
        if not before:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in before.items():
                params[name].copy_(value)
