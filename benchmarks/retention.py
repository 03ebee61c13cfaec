"""Sequential editing on the embedded SmolLM2 (issue 6): how earlier edits hold up as later ones are written.

Edits UnKEBench test records (default 20-49) one after another, keeping every edit, and after N edits
(default N = 10 and 30) regenerates the answer of every edit so far: ROUGE-L recall of edit i measured
after all N edits. The N = 10 point is the same run's state after its 10th edit (the edits are
deterministic, so a separate 10-edit run would be identical).

    python benchmarks/retention.py [--start 20 --checkpoints 10 30 --method memit]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import peak_rss_mb

from anyedit_lightning import edit_sequentially, load_model
from anyedit_lightning.benchmarks import UnKEBenchDataModule
from anyedit_lightning.core.requests import prompt_text
from anyedit_lightning.evaluation import generate_batch
from anyedit_lightning.metrics import rouge_l_recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--start", type=int, default=20)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--method", default="memit")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the per-edit scores as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = max(args.checkpoints)
    data = UnKEBenchDataModule(start=args.start, limit=n, split="test")
    data.setup("predict")
    requests = data.requests
    model, tokenizer = load_model()
    scores: dict[int, list[float]] = {}
    stops: dict[int, float] = {}
    started = time.perf_counter()

    def measure(i: int, _module) -> None:
        done = i + 1
        print(f"edit {done}/{n} done at {time.perf_counter() - started:.0f} s", flush=True)
        if done not in args.checkpoints:
            return
        prompts = [prompt_text(tokenizer, r) for r in requests[:done]]
        longest = max(len(tokenizer(r.target)["input_ids"]) for r in requests[:done])
        answers = generate_batch(model, tokenizer, prompts, max_new_tokens=longest + 30, batch_size=10)
        scores[done] = [rouge_l_recall(a.text, r.target) for a, r in zip(answers, requests)]
        stops[done] = sum(a.stopped for a in answers) / done
        print(f"after {done} edits: mean ROUGE-L {sum(scores[done]) / done:.3f}", flush=True)

    edit_sequentially(
        model,
        tokenizer,
        requests,
        method=args.method,
        anyedit=True,
        callback=measure,
        trainer_kwargs=dict(enable_progress_bar=False, logger=False),
    )
    seconds = time.perf_counter() - started
    print(
        f"\n{n} sequential {args.method.upper()}+AnyEdit edits of UnKEBench records {args.start}-{args.start + n - 1}: "
        f"{seconds:.0f} s with the measurements, peak RSS {peak_rss_mb():.0f} MB, torch threads {torch.get_num_threads()}"
    )
    print("| N | mean ROUGE-L of edits 1..N after N edits | first 10 edits | answers that stop |")
    print("|---|---|---|---|")
    for done in sorted(scores):
        first = scores[done][:10]
        print(
            f"| {done} | {sum(scores[done]) / done:.3f} | {sum(first) / len(first):.3f} | {100 * stops[done]:.0f}% |"
        )
    print("\nper edit (ROUGE-L of edit i after N edits):")
    for done in sorted(scores):
        print(f"N={done}: " + " ".join(f"{s:.2f}" for s in scores[done]))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(
                {"records_start": args.start, "scores": scores, "stopped": stops, "seconds": seconds},
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
