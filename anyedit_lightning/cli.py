"""Command line: ``python -m anyedit_lightning {bench,grid,retention,demo}`` (jsonargparse, dataclass configs).

Examples::

    python -m anyedit_lightning bench --model smollm2-135m-instruct --method memit --anyedit true \\
        --dataset unkebench --start 20 --limit 30 --out results/memit-anyedit
    python -m anyedit_lightning bench --config bench.yaml --max_new_tokens 64
    python -m anyedit_lightning bench --method unke --print_config > bench.yaml
    python -m anyedit_lightning grid --methods [memit,alphaedit,unke] --anyedit [false,true] \\
        --datasets [unkebench,akew] --include_unedited true --start 20 --limit 30 --out results/grid
    python -m anyedit_lightning retention --dataset unkebench --start 20 --limit 30 --checkpoints [1,5,10,20,30]
    python -m anyedit_lightning demo

``--edit '{"layers": [3, 4], "v_steps": 10}'`` overrides the preset's ``EditConfig`` values and
``--writer '{"mom2_weight": 50.0}'`` the writer's; ``--dataset`` also takes a .json/.jsonl file in the
UnKEBench schema.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from .evaluation.retention import RetentionConfig
from .evaluation.runner import BenchConfig, GridConfig


def _config_parser(cls: type, description: str) -> ArgumentParser:
    parser = ArgumentParser(description=description)
    parser.add_argument(
        "--config", action=ActionConfigFile, help="A YAML file with any of the options below."
    )
    parser.add_class_arguments(cls, fail_untyped=True)
    return parser


def build_parser() -> ArgumentParser:
    """The parser with ``bench``, ``grid``, ``retention`` and ``demo`` subcommands (``--print_config`` on all
    but the demo)."""
    parser = ArgumentParser(
        prog="python -m anyedit_lightning",
        description="AnyEdit long-form knowledge editing on PyTorch Lightning: benchmarks and demo.",
    )
    subcommands = parser.add_subcommands(dest="command", required=True)
    subcommands.add_subcommand(
        "bench",
        _config_parser(BenchConfig, "Edit, generate and score one method on one benchmark (resumable)."),
        help="one method (or 'none': the unedited model) on one dataset",
    )
    subcommands.add_subcommand(
        "grid",
        _config_parser(
            GridConfig, "Every method × AnyEdit flag × dataset (plus the unedited model) into one folder."
        ),
        help="methods × AnyEdit × datasets, one combined table and plot",
    )
    subcommands.add_subcommand(
        "retention",
        _config_parser(
            RetentionConfig, "Keep many edits in one model; after each, do all of them still work?"
        ),
        help="sequential or batch editing: retention of every edit so far, locality, seconds",
    )
    subcommands.add_subcommand(
        "demo", ArgumentParser(description="Edit the embedded model and show before/after."), help="the demo"
    )
    return parser


def to_config(cls: type, namespace: Namespace) -> Any:
    """A dataclass instance from the subcommand's parsed namespace."""
    values = namespace.as_dict()
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def _describe(row: dict[str, Any]) -> str:
    original = row.get("original") or {}

    def pct(key: str) -> str:
        value = original.get(key)
        return "–" if value is None else f"{100 * value:.2f}"

    seconds = row.get("seconds_per_edit")
    stopped = row.get("stopped")
    faithful = row.get("faithfulness") or {}

    def fmt(key: str, scale: float = 100.0, digits: int = 1) -> str:
        value = faithful.get(key)
        return "–" if value is None else f"{scale * value:.{digits}f}"

    extra = (
        f"  locality {fmt('locality_agreement')}% KL {fmt('locality_kl', 1.0, 3)}  "
        f"neighbours {fmt('neighbourhood_agreement')}%  degenerate {fmt('degenerate')}%  "
        f"PPL x{fmt('perplexity_ratio', 1.0, 3)}"
        if faithful
        else ""
    )
    return (
        f"{row['label']:<18} {row['dataset']:<16} n={row.get('n', 0):<3} BLEU(char) {pct('char_bleu')}  "
        f"ROUGE-L {pct('rougeL')}  Sim {pct('similarity')}  "
        f"s/edit {'–' if seconds is None else f'{seconds:.2f}'}  "
        f"stopped {'–' if stopped is None else f'{100 * stopped:.0f}%'}" + extra
    )


def run_demo(argv: Sequence[str]) -> int:
    """``anyedit_lightning.demo.main()``, imported only when asked for (it loads a model)."""
    if importlib.util.find_spec(f"{__package__}.demo") is None:
        print(
            "The demo is not available in this installation (anyedit_lightning/demo.py is missing).",
            file=sys.stderr,
        )
        return 2
    main_fn = importlib.import_module(f"{__package__}.demo").main
    takes_args = bool(inspect.signature(main_fn).parameters)
    if argv and not takes_args:
        print(f"demo takes no arguments, got {list(argv)}", file=sys.stderr)
        return 2
    result = main_fn(list(argv)) if takes_args else main_fn()
    return result if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m anyedit_lightning`` and the ``anyedit`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Every edit builds its own Trainer; its "GPU available ..." banner would repeat once per request.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # transformers draws a "Loading weights" bar per checkpoint (the model, the embeddings model): noise here.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if argv and argv[0] == "demo":
        return run_demo(argv[1:])
    parser = build_parser()
    namespace = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .evaluation.retention import run_retention
    from .evaluation.runner import run_benchmark, run_grid
    from .models.loading import ModelLoadError

    command = namespace.command
    try:
        if command == "bench":
            config = to_config(BenchConfig, namespace.bench)
            rows = [run_benchmark(config)]
        elif command == "grid":
            config = to_config(GridConfig, namespace.grid)
            rows = run_grid(config)["results"]
        elif command == "retention":
            config = to_config(RetentionConfig, namespace.retention)
            run_retention(config)
            out = Path(config.out)
            print((out / "retention.md").read_text())
            print(f"Rows: {out / 'retention.jsonl'}\nPlot: {out / 'retention.png'}")
            return 0
        else:  # pragma: no cover - "demo" is handled above
            return run_demo([])
    except (ValueError, FileNotFoundError, ModelLoadError) as error:
        # Bad settings or data (zero records selected, λ = 0, ...): a message and exit status 2.
        logging.getLogger(__name__).debug("bad %s settings", command, exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(config.out)
    for row in rows:
        if row:
            print(_describe(row))
    print(f"Predictions: {out / 'predictions.jsonl'}\nSummary: {out / 'summary.json'}")
    print(f"Table: {out / 'results.md'}\nPlot: {out / 'results.png'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
