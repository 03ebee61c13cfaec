"""Where chunk 0's δ goes, judged by what the edit does to everyday answers (docs/faithful.md, step 8).

Each UnKEBench dev record is edited into the unedited embedded SmolLM2 once per ``--first-keys`` value and
scored with the library's own report at full size (``edit_report``: all everyday prompts of set a, set b,
neighbours, held-out perplexity). Next to the teacher-forced agreement it counts, over the everyday
prompts regenerated before and after (40 tokens), the answers that changed at all and those whose first
sentence changed: what the agreement figures mean in text. It also records, per touched tensor, the
edit's component along the unedited weights (``<ΔW, W0> / |W0|²``; AdamW's decay alone gives ``-lr·wd·steps``),
which shows whether a write rescales the layer. Rows append to ``--out`` (JSONL), weights are restored
bit-exactly after each edit.

    OMP_NUM_THREADS=2 python benchmarks/first_key_probe.py --start 0 --limit 4 --out rows.jsonl
    OMP_NUM_THREADS=2 python benchmarks/first_key_probe.py --start 0 --limit 1 --first-keys content_end \\
        --writer '{"weight_decay": 0.0}' --out rows.jsonl
    OMP_NUM_THREADS=2 python benchmarks/first_key_probe.py --first-keys content_word --edit '{"clamp": 0.75}' \\
        --out rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from anyedit_lightning import edit, edit_report, load_model
from anyedit_lightning.benchmarks.unkebench import UnKEBenchDataModule
from anyedit_lightning.core.weights import restore
from anyedit_lightning.evaluation.faithfulness import FaithfulnessOptions

FIRST_KEYS = ("content_end", "content_word")


def first_sentence(text: str) -> str:
    """Up to the first full stop (a decimal point counts too: a changed number is a changed answer)."""
    return text.split(".")[0]


def along_weights(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per touched tensor: the edit's component along the unedited weights (negative: the tensor shrank)."""
    params = dict(model.named_parameters())
    return {
        name: float(((params[name].detach() - w0) * w0).sum() / (w0 * w0).sum())
        for name, w0 in before.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--first-keys", nargs="+", default=list(FIRST_KEYS))
    parser.add_argument("--writer", type=json.loads, default={}, help="writer keyword overrides (JSON)")
    parser.add_argument(
        "--edit", type=json.loads, default={}, help="EditConfig overrides, e.g. the clamp (JSON)"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model()
    data = UnKEBenchDataModule(start=args.start, limit=args.limit, split="dev")
    data.setup()
    # all everyday prompts, each regenerated; set b, neighbours and perplexity at the runner's sizes
    options = FaithfulnessOptions(
        locality_prompts=None, fluency_prompts=100, cross_questions=12, neighbours=8, perplexity_tokens=2048
    )
    with open(args.out, "a") as out:
        for first_key in args.first_keys:
            for request in data.requests:
                started = time.perf_counter()
                module = edit(
                    model, tokenizer, request, first_key=first_key, writer_kwargs=args.writer, **args.edit
                )
                seconds = time.perf_counter() - started
                report = edit_report(model, tokenizer, module, options=options, max_new_tokens=256)
                samples = report.locality_samples
                changed = [s for s in samples if s["before"].strip() != s["after"].strip()]
                first_changed = [
                    s for s in samples if first_sentence(s["before"]) != first_sentence(s["after"])
                ]
                row = {
                    "first_key": first_key,
                    "index": request.extra["index"],
                    "writer_kwargs": args.writer,
                    "edit_overrides": args.edit,
                    "efficacy": report.efficacy_rougeL,
                    "para": report.paraphrase_rougeL,
                    "set_a": report.locality_agreement,
                    "set_a_kl": report.locality_kl,
                    "set_b": report.cross_agreement,
                    "neighbour": report.neighbourhood_agreement,
                    "ppl": report.perplexity_ratio,
                    "n_samples": len(samples),
                    "answers_changed": len(changed),
                    "first_sentence_changed": len(first_changed),
                    "seconds": seconds,
                    "shrink": along_weights(model, module.edit_record.before),
                    "changed": changed,
                }
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(
                    json.dumps({k: v for k, v in row.items() if k not in ("changed", "shrink")}), flush=True
                )
                restore(dict(model.named_parameters()), module.edit_record.before)


if __name__ == "__main__":
    main()
