"""The six configurations (MEMIT, AlphaEdit, UnKE, each with and without AnyEdit) on the embedded SmolLM2
(issue 3): seconds per edit and per chunk, peak memory during the edit, ROUGE-L recall of the
regenerated target, and whether the answer stops.

By default on the three fictional long-form requests of the end-to-end test (data/fictional_edits.json,
150+ tokens each, one of them code); ``--dev-tokens N`` uses an EditEverything dev record cut to N tokens.

    python benchmarks/methods.py [--methods memit alphaedit unke] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from _common import RssPeak, dev_requests, fictional_requests, timed_edit

from anyedit_lightning import compute_covariance, get_preset, load_model
from anyedit_lightning.core.weights import restore, snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["memit", "alphaedit", "unke"])
    parser.add_argument("--dev-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    base = snapshot(model.state_dict())
    preset = get_preset("smollm2-135m-instruct")
    requests = dev_requests(1, args.dev_tokens, tokenizer) if args.dev_tokens else fictional_requests()
    for i, request in enumerate(requests):
        print(f"request {i}: {request.prompt!r}, {len(tokenizer(request.target)['input_ids'])} target tokens")
    rows = []
    for method in args.methods:
        stats = None
        if method != "unke":
            layers = sorted(
                set(preset.config(method, True).layers) | set(preset.config(method, False).layers)
            )
            stats = compute_covariance(
                model, tokenizer, layers, corpus=preset.stats_corpus(method), max_tokens=preset.stats_tokens
            )
        for anyedit in (False, True):
            name = method.upper().replace("ALPHAEDIT", "AlphaEdit").replace("UNKE", "UnKE") + (
                "+AnyEdit" if anyedit else ""
            )
            for i, request in enumerate(requests):
                with RssPeak() as memory:
                    seconds, rouge, stopped, module = timed_edit(
                        model, tokenizer, request, method=method, anyedit=anyedit, stats=stats
                    )
                chunks = len(module.plans[0].chunks)
                rows.append(
                    (
                        name,
                        i,
                        seconds,
                        seconds / chunks,
                        chunks,
                        rouge,
                        stopped,
                        memory.peak,
                        memory.peak - memory.start,
                    )
                )
                print(rows[-1], flush=True)
                restore(model.state_dict(), base)
    print(f"\ntorch threads {torch.get_num_threads()}")
    print(
        "| configuration | request | s/edit | s/chunk | chunks | ROUGE-L recall | stops | peak RSS MB (extra) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, i, seconds, per_chunk, chunks, rouge, stopped, peak, extra in rows:
        print(
            f"| {name} | {i} | {seconds:.1f} | {per_chunk:.2f} | {chunks} | {rouge:.3f} | {'yes' if stopped else 'no'} | {peak:.0f} (+{extra:.0f}) |"
        )
    print("\n| configuration | mean ROUGE-L | mean s/edit |")
    print("|---|---|---|")
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name]
        print(
            f"| {name} | {sum(r[5] for r in mine) / len(mine):.3f} | {sum(r[2] for r in mine) / len(mine):.1f} |"
        )


if __name__ == "__main__":
    main()
