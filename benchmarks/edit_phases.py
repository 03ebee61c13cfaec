"""Where one default edit spends its time: the δ optimisation (the fit's chunks) vs the weight write.

Edits UnKEBench dev records into the embedded SmolLM2 with ``edit(model, tok, request)`` and the
preset's recommended method (or ``--method``), restoring the weights after each, and prints per record
the seconds of the whole edit, of the write callback, and the chunks and δ steps taken.

    OMP_NUM_THREADS=2 python benchmarks/edit_phases.py --records 3 [--method memit] [--threads 2]
    OMP_NUM_THREADS=2 python benchmarks/edit_phases.py --records 3 \
        --writer '{}' --writer '{"scope": "mlp", "preservation_positions": 2048}'

Each ``--writer`` (JSON writer overrides on top of the preset's) is timed on every record in the same run,
so the printed ratios compare configurations on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import WriteClock

from anyedit_lightning import edit, load_model
from anyedit_lightning.benchmarks import get_datamodule
from anyedit_lightning.core.weights import restore, snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, nargs="+", default=[3], help="dev record indices (0-19)")
    parser.add_argument("--method", default=None, help="memit, alphaedit or unke (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--writer", action="append", default=None, help="writer overrides as JSON (repeat to compare)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    data = get_datamodule("unkebench", start=0, limit=20, split="dev")
    requests = {r.extra["index"]: r for r in data.requests}
    params = dict(model.named_parameters())
    base = snapshot(params)
    writers = [json.loads(w) for w in args.writer or ["{}"]]
    with WriteClock() as clock:
        for index in args.records:
            totals = []
            for overrides in writers:
                started = time.perf_counter()
                module = edit(
                    model,
                    tokenizer,
                    requests[index],
                    method=args.method,
                    writer_kwargs=overrides,
                    trainer_kwargs={"enable_progress_bar": False, "logger": False},
                )
                totals.append(time.perf_counter() - started)
                steps = sum(m["steps"] for m in module.chunk_metrics)
                print(
                    f"record {index} {json.dumps(overrides)}: edit {totals[-1]:.1f} s, "
                    f"write {clock.seconds[-1]:.1f} s, "
                    f"δ optimisation and the rest {totals[-1] - clock.seconds[-1]:.1f} s; "
                    f"{len(module.chunk_metrics)} chunks, {steps} δ steps"
                    + (f"; {totals[0] / totals[-1]:.2f}x faster than the first" if len(totals) > 1 else ""),
                    flush=True,
                )
                restore(params, base)


if __name__ == "__main__":
    main()
