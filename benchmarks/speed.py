"""Reference vs fast δ optimisation on the embedded SmolLM2 (issue 7).

Edits the same requests of about 100, 250 and 450 tokens with ``fast=False`` (the whole model over the
whole prefix at every Adam step, as docs/algorithm.md §3 and the authors' code) and ``fast=True`` (prefix
cached, lower layers replayed), and prints seconds per edit, the ratio, peak memory and ROUGE-L.

    python benchmarks/speed.py [--lengths 100 250 450] [--threads 2] [--window 40 --steps 10]

By default both paths run a fixed number of Adam steps per chunk (no early stop), so they do the same
work and the ratio is the cost per step; ``--early-stop`` restores the preset's stopping rule.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import dev_requests, peak_rss_mb, timed_edit

from anyedit_lightning import compute_covariance, get_preset, load_model
from anyedit_lightning.core.weights import restore, snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 250, 450])
    parser.add_argument("--method", default="memit")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--window", type=int, default=40, help="tokens per chunk (the issue's 40-token windows)"
    )
    parser.add_argument("--steps", type=int, default=10, help="Adam steps per chunk")
    parser.add_argument(
        "--early-stop", type=float, default=0.0, help="stop a chunk below this NLL (0: never)"
    )
    args = parser.parse_args()
    overrides = dict(window=args.window, v_steps=args.steps, early_stop=args.early_stop)
    print(f"settings: {overrides}, method {args.method}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    base = snapshot(model.state_dict())
    preset = get_preset("smollm2-135m-instruct")
    stats = compute_covariance(
        model,
        tokenizer,
        preset.config(args.method, True).layers,
        corpus=preset.stats_corpus(args.method),
        max_tokens=preset.stats_tokens,
    )
    rows = []
    for length in args.lengths:
        request = dev_requests(1, length, tokenizer)[0]
        tokens = len(tokenizer(request.target)["input_ids"])
        result = {}
        for fast in (False, True):
            t0 = time.perf_counter()
            seconds, rouge, stopped, module = timed_edit(
                model, tokenizer, request, method=args.method, stats=stats, fast=fast, **overrides
            )
            deltas = torch.cat([torch.stack(p.deltas) for p in module.plans])
            weights = {
                n: p.detach().clone() for n, p in model.named_parameters() if n in module.edit_record.before
            }
            result[fast] = (seconds, rouge, stopped, deltas, weights, len(module.plans[0].chunks))
            restore(model.state_dict(), base)
            print(
                f"  {tokens} tokens fast={fast}: {seconds:.1f} s, ROUGE-L {rouge:.3f} ({time.perf_counter() - t0:.1f} s with generation)",
                flush=True,
            )
        (s_ref, r_ref, _, d_ref, w_ref, chunks), (s_fast, r_fast, _, d_fast, w_fast, _) = (
            result[False],
            result[True],
        )
        d_err = float((d_ref - d_fast).norm() / d_ref.norm())
        w_err = max(float((w_ref[n] - w_fast[n]).norm() / w_ref[n].norm()) for n in w_ref)
        rows.append((tokens, chunks, s_ref, s_fast, s_ref / s_fast, r_ref, r_fast, d_err, w_err))
    print(f"\npeak RSS {peak_rss_mb():.0f} MB, torch threads {torch.get_num_threads()}")
    print(
        "| target tokens | chunks | reference s/edit | fast s/edit | ratio | ROUGE-L ref | ROUGE-L fast | δ rel. diff | W rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| {} | {} | {:.1f} | {:.1f} | {:.2f}× | {:.3f} | {:.3f} | {:.1e} | {:.1e} |".format(*row))


if __name__ == "__main__":
    main()
