"""Today's recommended configuration vs a faster one, side by side in one run, and batch throughput.

    OMP_NUM_THREADS=2 python benchmarks/speed_configs.py --split test --start 20 --limit 10 --long 2 \
        --batch-sizes 4 16 --out ../docs/results/speed_configs

Every edit starts from the unedited weights. Per UnKEBench record (and per EditEverything record cut to
about ``--long-tokens`` tokens), each configuration edits the same request in turn, so a change in the
machine's speed during the run hits both alike. Per edit: seconds (and the weight write's share), peak
resident memory, efficacy (ROUGE-L recall of the regenerated answer and whether it stops), locality
agreement with the unedited model on everyday prompts (set a) and on another benchmark's questions
(set b), and the held-out perplexity ratio (docs/faithful.md). Then batch throughput: the first k
UnKEBench records in one edit (one δ phase, one write), edits per minute, for each configuration.

Configurations: ``today`` is the preset (``edit(model, tok, request)``) with ``--today-writer`` overrides;
``fast`` adds ``--fast-writer`` and ``--fast-edit`` overrides (default: the UnKE write in bf16 mixed
precision, which the preset's ``compute_dtype="auto"`` already picks on CPUs with AVX512-BF16 or AMX: the
run of docs/results/speed.md is ``--today-writer '{"compute_dtype": null}'``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import RssPeak, WriteClock, requests_of_length

from anyedit_lightning import edit, load_model
from anyedit_lightning.benchmarks import get_datamodule
from anyedit_lightning.core.weights import restore, snapshot
from anyedit_lightning.evaluation.config import BenchConfig
from anyedit_lightning.evaluation.faithfulness import FaithfulnessProbe
from anyedit_lightning.evaluation.retention import answer_scores

SCORES = ("locality_agreement", "cross_agreement", "perplexity_ratio")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", default="test", choices=["dev", "test"])
    parser.add_argument("--start", type=int, default=20, help="first UnKEBench record position")
    parser.add_argument("--limit", type=int, default=10, help="UnKEBench records edited one at a time")
    parser.add_argument("--long", type=int, default=2, help="EditEverything records (0: none)")
    parser.add_argument("--long-tokens", type=int, default=450)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[4, 16])
    parser.add_argument(
        "--today-writer", default="{}", help="JSON writer overrides of the reference configuration"
    )
    parser.add_argument("--fast-writer", default='{"compute_dtype": "bfloat16"}', help="JSON")
    parser.add_argument("--fast-edit", default="{}", help="JSON EditConfig overrides")
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="answer limit (raised to the target's length + 32)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="results/speed_configs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {
        "today": (json.loads(args.today_writer), {}),
        "fast": (json.loads(args.fast_writer), json.loads(args.fast_edit)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "speed.jsonl"
    rows_path.write_text("")
    model, tokenizer = load_model()
    params = dict(model.named_parameters())
    base = snapshot(params)
    scoring = BenchConfig(max_new_tokens=args.max_new_tokens)
    wanted = max([args.limit, *args.batch_sizes])
    pool = get_datamodule("unkebench", start=args.start, limit=wanted, split=args.split).requests
    if len(pool) < wanted:
        parser.error(f"only {len(pool)} {args.split} records from {args.start}: lower --limit/--batch-sizes")
    positions = range(20) if args.split == "dev" else range(20, 10**6)  # stops at the file's end
    long = requests_of_length(args.long, args.long_tokens, tokenizer, positions)
    probes = {}

    def probe_for(benchmark: str) -> FaithfulnessProbe:
        if benchmark not in probes:  # the unedited reference, once per benchmark (weights are at base)
            options = scoring.faithfulness_options(neighbours=0, fluency_prompts=0)
            probes[benchmark] = FaithfulnessProbe(model, tokenizer, benchmark, options).prepare()
        return probes[benchmark]

    def measure(kind: str, name: str, requests: list) -> dict:
        writer, overrides = configs[name]
        benchmark = requests[0].extra.get("benchmark") or "unkebench"
        probe = probe_for(benchmark)
        with WriteClock() as clock, RssPeak() as peak:
            started = time.perf_counter()
            module = edit(
                model,
                tokenizer,
                requests,
                writer_kwargs=writer,
                trainer_kwargs={"enable_progress_bar": False, "logger": False},
                **overrides,
            )
            seconds = time.perf_counter() - started
        tokens = [len(tokenizer(r.target)["input_ids"]) for r in requests]
        with torch.no_grad():
            limit = BenchConfig(max_new_tokens=max(args.max_new_tokens, max(tokens) + 32))
            scores = answer_scores(model, tokenizer, requests, limit)
            faithful = probe.measure_edit(touched=module.edit_record.before)
        restore(params, base)
        row = {
            "kind": kind,
            "config": name,
            "records": [r.extra.get("index") for r in requests],
            "benchmark": benchmark,
            "target_tokens": tokens,
            "seconds": round(seconds, 2),
            "write_seconds": round(sum(clock.seconds), 2),
            "edits_per_minute": round(60 * len(requests) / seconds, 3),
            "peak_rss_mb": round(peak.peak),
            "rouge_l": scores["rouge_l"],
            "per_edit": scores["per_edit"],
            "stopped": scores["stopped"],
            "delta_steps": sum(m["steps"] for m in module.chunk_metrics),
            **{k: faithful.get(k) for k in SCORES},
        }
        with open(rows_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(
            f"{kind} {row['records']} {name}: {seconds:.1f} s (write {row['write_seconds']:.1f} s), "
            f"ROUGE-L {row['rouge_l']:.3f}, locality {row['locality_agreement']:.3f} / "
            f"{row['cross_agreement']:.3f}, PPL x{row['perplexity_ratio']:.3f}",
            flush=True,
        )
        return row

    runs = [("single", [r]) for r in pool[: args.limit]]
    runs += [(f"batch of {size}", pool[:size]) for size in args.batch_sizes]
    runs += [(f"~{args.long_tokens} tokens", [r]) for r in long]
    rows = [measure(kind, name, requests) for kind, requests in runs for name in configs]
    report = table(rows, list(configs))
    (out / "results.md").write_text(report)
    print(report)


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def table(rows: list[dict], names: list[str]) -> str:
    """Per kind of run and configuration: the means, and each configuration's speed-up over the first."""
    lines = [
        "| run | config | edits | s per edit | speed-up | write share | edits/min | ROUGE-L | stop | "
        "locality (a) | (b) | PPL × | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        group = {n: [r for r in rows if r["kind"] == kind and r["config"] == n] for n in names}
        base = None
        for name in names:
            runs = group[name]
            if not runs:
                continue
            edits = sum(len(r["records"]) for r in runs)
            per_edit = sum(r["seconds"] for r in runs) / edits
            base = base or per_edit
            lines.append(
                f"| {kind} | {name} | {edits} | {per_edit:.1f} | {base / per_edit:.2f}× | "
                f"{sum(r['write_seconds'] for r in runs) / sum(r['seconds'] for r in runs):.0%} | "
                f"{60 / per_edit:.2f} | {_mean(runs, 'rouge_l'):.3f} | {_mean(runs, 'stopped'):.0%} | "
                f"{_mean(runs, 'locality_agreement'):.3f} | {_mean(runs, 'cross_agreement'):.3f} | "
                f"{_mean(runs, 'perplexity_ratio'):.3f} | {max(r['peak_rss_mb'] for r in runs)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
