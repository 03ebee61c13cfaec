"""Per-chunk δ difference between the reference and the fast paths on the embedded SmolLM2 (issue 7).

Runs the δ optimisation only (no write) for one ~450-token request three ways: the reference path,
the fast path with the prefix cache grown chunk by chunk (a single request's default), and the fast
path with the prefix rebuilt per chunk (what batches use), and prints the relative δ difference per
chunk. It shows how float32 rounding differences are amplified along the chunk chain.

    python benchmarks/chunk_divergence.py [--tokens 450 --window 40 --steps 10]
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from unittest import mock

import torch
from _common import dev_requests

from anyedit_lightning import AnyEditModule, default_trainer, get_preset, load_model
from anyedit_lightning.core.optimize import DeltaOptimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=450)
    parser.add_argument("--window", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="float32", help="float64 shows what rounding alone contributes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(dtype=args.dtype)
    request = dev_requests(1, args.tokens, tokenizer)[0]
    preset = get_preset("smollm2-135m-instruct")

    def deltas(fast: bool, grow: bool = True) -> list[torch.Tensor]:
        config = preset.config(
            "memit", True, window=args.window, v_steps=args.steps, early_stop=0.0, fast=fast
        )
        module = AnyEditModule(model, tokenizer, [request], config)
        rebuild = mock.patch.object(DeltaOptimizer, "_grow_prefix", lambda *a: None)
        with nullcontext() if grow else rebuild:
            default_trainer(model, [], logger=False, enable_progress_bar=False).fit(module)  # no writer
        return module.plans[0].deltas

    grown, rebuilt, reference = deltas(True), deltas(True, grow=False), deltas(False)

    def row(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
        return " | ".join(f"{float((x - y).norm() / y.norm()):.1e}" for x, y in zip(a, b))

    print(
        f"{len(tokenizer(request.target)['input_ids'])} target tokens, window {args.window}, {args.steps} steps per chunk"
    )
    print("| chunk | " + " | ".join(str(i + 1) for i in range(len(reference))) + " |")
    print("|---|" + "---|" * len(reference))
    print(f"| fast (grown prefix) vs reference | {row(grown, reference)} |")
    print(f"| fast (rebuilt prefix) vs reference | {row(rebuilt, reference)} |")
    print(f"| grown vs rebuilt | {row(grown, rebuilt)} |")


if __name__ == "__main__":
    main()
