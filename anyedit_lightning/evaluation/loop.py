"""The benchmark loop (docs/algorithm.md §6) as a ``LightningModule`` run by ``Trainer.predict``."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from .. import api
from ..fingerprint import weights_fingerprint
from ..requests import EditRequest
from ..stats import CovarianceStats
from .config import COVARIANCE_METHODS, BenchConfig, resolved, settings_hash
from .scoring import build_record, faithful_record, generate_answers
from .store import PREDICTIONS, PredictionWriter, merge_rank_files, prediction_files, read_records, record_key

log = logging.getLogger(__name__)


class BenchmarkModule(L.LightningModule):
    """Edit → generate → score → restore, one DataModule batch per ``predict_step``.

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
        super().__init__()
        config = resolved(config)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.stats = stats
        self.keep_edits = keep_edits
        self.out = Path(config.out)
        self.settings = settings_hash(config)
        self.done: set[tuple] = set()
        self.edits_performed = 0
        self.records_written = 0
        self._writer: PredictionWriter | None = None
        self._originals: dict[str, torch.Tensor] = {}  # sequential: first snapshot of each touched tensor
        self._device: torch.device | None = None

    # ---- Lightning plumbing ------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # a list of EditRequest: text, tokenized by the editor and the generator

    @property
    def predictions_path(self) -> Path:
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            return self.out / f"predictions.rank{self.global_rank}.jsonl"
        return self.out / PREDICTIONS

    def on_predict_start(self) -> None:
        self._device = next(self.model.parameters()).device
        existing = read_records(prediction_files(self.out))
        self.done = {record_key(r) for r in existing}
        others = {r.get("settings") for r in existing if r.get("method") == self.config.method} - {
            self.settings,
            None,
        }
        if others:
            log.warning(
                "%s already holds records made with other settings; they are reused as they are. "
                "Use a new --out folder to rerun with the new settings.",
                self.out,
            )
        self._writer = PredictionWriter(self.predictions_path)
        self._probe = self._make_probe() if self.config.faithfulness else None

    def on_predict_end(self) -> None:
        if self.config.sequential and not self.keep_edits:
            self._restore(self._originals)
        self._originals = {}
        world = self.trainer.world_size
        if world > 1:
            self.trainer.strategy.barrier()
            if self.trainer.is_global_zero:
                merge_rank_files(self.out)
            self.trainer.strategy.barrier()

    # ---- the step ----------------------------------------------------------------------------------
    def predict_step(self, batch: list[EditRequest], batch_idx: int) -> list[dict[str, Any]]:
        """Edit, generate, score and restore for the batch's unfinished requests; returns their records."""
        key = self._key
        todo = [r for r in batch if key(r) not in self.done]
        if len(todo) < len(batch):
            log.info("Skipping %d request(s) already in %s", len(batch) - len(todo), self.out)
            if self.config.sequential:
                log.warning("Resuming a sequential run: the skipped requests' edits are not replayed.")
        if not todo:
            return []
        edit_seconds, chunks, before = None, [None] * len(todo), {}
        try:
            if self.config.method != "none":
                started = time.perf_counter()
                module = self._edit(todo)
                edit_seconds = time.perf_counter() - started
                self.edits_performed += 1
                before = module.edit_record.before
                chunks = [len(plan.chunks) for plan in module.plans]
            started = time.perf_counter()
            answers = generate_answers(self.model, self.tokenizer, todo, self.config)
            generation_seconds = time.perf_counter() - started
            faithfulness = self._faithfulness(todo, before)
        finally:
            if self.config.sequential:
                for name, value in before.items():
                    self._originals.setdefault(name, value)
            else:
                self._restore(before)
        records = []
        for request, answer, n_chunks, faithful in zip(todo, answers, chunks, faithfulness):
            record = build_record(
                request,
                answer,
                self.config,
                self.settings,
                self._device if self._device is not None else "cpu",
                n_chunks,
                edit_seconds,
                generation_seconds,
                len(todo),
            )
            record["faithfulness"] = faithful_record(request, answer, faithful)
            self._writer.write(record)
            records.append(record)
            self.done.add(key(request))
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

    def _key(self, request: EditRequest) -> tuple:
        extra = request.extra
        return record_key(
            {
                "method": self.config.method,
                "anyedit": self.config.anyedit,
                "benchmark": extra.get("benchmark", self.config.dataset),
                "index": extra["index"],
            }
        )

    def _edit(self, requests: list[EditRequest]):
        stats = self.stats
        if self.config.sequential and stats is not None and self.config.method in COVARIANCE_METHODS:
            # Sequential MEMIT/AlphaEdit use the *unedited* model's C for every edit (the statistics are
            # of generic text, not of the edits), but the writers check the weights fingerprint: tell
            # them these statistics are meant for the current weights.
            stats = dataclasses.replace(stats, fingerprint=weights_fingerprint(self.model))
        with torch.inference_mode(False), torch.enable_grad():
            module = api.edit(
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
        self._back_to_device()
        return module

    def _make_probe(self):
        """The unedited reference for this run, computed now (the weights are still the starting ones)."""
        from .faithfulness import FaithfulnessOptions, FaithfulnessProbe

        c = self.config
        options = FaithfulnessOptions(
            locality_prompts=c.locality_prompts,
            cross_questions=c.cross_questions,
            neighbours=c.neighbours,
            fluency_prompts=c.fluency_prompts,
            perplexity_tokens=c.perplexity_tokens,
            batch_size=c.generation_batch_size,
        )
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        requests = list(getattr(datamodule, "requests", None) or [])
        pending = [r.prompt for r in requests if self._key(r) not in self.done]
        if requests and not pending:
            return None
        started = time.perf_counter()
        try:
            probe = FaithfulnessProbe(self.model, self.tokenizer, c.dataset, options).prepare(pending)
        except FileNotFoundError as error:  # an installed package without the data/ folder
            log.warning("Faithfulness metrics are off: %s", error)
            return None
        log.info("Unedited faithfulness reference: %.1f s", time.perf_counter() - started)
        return probe

    def _faithfulness(self, requests: list[EditRequest], before: Mapping[str, torch.Tensor]) -> list:
        """Per request: the set-level scores of this edit plus its neighbourhood (None when switched off)."""
        if getattr(self, "_probe", None) is None:
            return [None] * len(requests)
        started = time.perf_counter()
        unedited = {**before, **self._originals}  # sequential: each tensor's first snapshot is the start
        shared = self._probe.measure_edit(touched=unedited.keys())
        rows = [{**shared, **self._probe.measure_neighbourhood(r.prompt, unedited)} for r in requests]
        for row in rows:
            row["seconds"] = (time.perf_counter() - started) / len(requests)
        return rows

    def _back_to_device(self) -> None:
        """Lightning's strategy teardown moves a fitted module to the CPU; bring the model back."""
        if self._device is not None and next(self.model.parameters()).device != self._device:
            self.model.to(self._device)

    def _restore(self, before: Mapping[str, torch.Tensor]) -> None:
        """Copy the snapshots back: the weights become bit-identical to what they were before the edit."""
        if not before:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in before.items():
                params[name].copy_(value)
