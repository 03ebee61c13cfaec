"""The six configurations on one ~150-token request (issue 3): seconds per edit and per chunk, peak memory,
ROUGE-L recall of the regenerated target, and whether the answer stops.

    python benchmarks/methods.py [--tokens 150]
"""

from __future__ import annotations

import argparse

from _common import dev_requests, peak_rss_mb, restore, timed_edit
from anyedit_lightning import compute_covariance, get_preset, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=150)
    args = parser.parse_args()
    model, tokenizer = load_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    preset = get_preset("smollm2-135m-instruct")
    request = dev_requests(1, args.tokens, tokenizer)[0]
    print(f"request: {request.prompt!r}, {len(tokenizer(request.target)['input_ids'])} target tokens")
    rows = []
    for method in ("memit", "alphaedit", "unke"):
        stats = None
        if method != "unke":
            layers = sorted(set(preset.config(method, True).layers) | set(preset.config(method, False).layers))
            stats = compute_covariance(model, tokenizer, layers, max_tokens=preset.stats_tokens)
        for anyedit in (False, True):
            seconds, rouge, stopped, module = timed_edit(model, tokenizer, request, method=method, anyedit=anyedit, stats=stats)
            chunks = len(module.plans[0].chunks)
            name = method.upper() + ("+AnyEdit" if anyedit else "")
            rows.append((name, seconds, seconds / chunks, chunks, rouge, stopped))
            print(rows[-1], flush=True)
            restore(model, base)
    print(f"\npeak RSS {peak_rss_mb():.0f} MB")
    print("| method | s/edit | s/chunk | chunks | ROUGE-L recall | stops |")
    print("|---|---|---|---|---|---|")
    for name, seconds, per_chunk, chunks, rouge, stopped in rows:
        print(f"| {name} | {seconds:.1f} | {per_chunk:.2f} | {chunks} | {rouge:.3f} | {'yes' if stopped else 'no'} |")


if __name__ == "__main__":
    main()
