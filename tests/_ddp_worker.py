"""Standalone worker for ``test_distributed.py``: statistics and a benchmark under Lightning DDP on CPU.

Lightning's ``strategy="ddp"`` (Trainer or Fabric) re-runs this script once per extra rank (that is why it is a script and
not a pytest function).

* ``python tests/_ddp_worker.py stats OUT DEVICES``: every rank saves what it saw (``OUT/rank{r}.pt``:
  the number of batches it was given and the reduced result), so the test can check both the
  all-reduce and the sharding.
* ``python tests/_ddp_worker.py bench OUT DEVICES DATA``: a MEMIT+AnyEdit benchmark of the tiny
  Llama on the records in ``DATA`` (a Fabric with DEVICES CPU processes), predictions in ``OUT``
  (merged by rank 0 when DEVICES > 1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import CORPUS, build_tokenizer, tiny_model  # noqa: E402

from anyedit_lightning.stats import covariance as stats_module  # noqa: E402
from anyedit_lightning.stats.covariance import compute_covariance  # noqa: E402

LAYERS = [1, 2]
MAX_TOKENS = 600
TOKENS_PER_BATCH = 128
TEXTS = [line for line in CORPUS.splitlines() if line.strip()] * 6


def run(devices: int) -> tuple[dict, dict]:
    """The statistics with ``devices`` CPU processes (1: no DDP), and what this rank computed."""
    torch.set_num_threads(1)
    model = tiny_model("llama")
    tokenizer = build_tokenizer()
    seen: dict = {"batches": 0}
    original = stats_module.CovarianceModule.test_step

    def counting_step(self, batch, batch_idx):
        seen["batches"] += 1
        return original(self, batch, batch_idx)

    stats_module.CovarianceModule.test_step = counting_step
    try:
        kwargs = dict(
            accelerator="cpu",
            devices=devices,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
        )
        if devices > 1:
            kwargs["strategy"] = "ddp"
        trainer = L.Trainer(**kwargs)
        stats = compute_covariance(
            model,
            tokenizer,
            LAYERS,
            corpus=TEXTS,
            max_tokens=MAX_TOKENS,
            seq_len=32,
            tokens_per_batch=TOKENS_PER_BATCH,
            use_cache=False,
            trainer=trainer,
        )
    finally:
        stats_module.CovarianceModule.test_step = original
    total = len(
        stats_module.token_batches(
            tokenizer, TEXTS, MAX_TOKENS, seq_len=32, tokens_per_batch=TOKENS_PER_BATCH
        )
    )
    info = {
        "rank": trainer.global_rank,
        "world": trainer.world_size,
        "batches_seen": seen["batches"],
        "batches_total": total,
        "counts": stats.counts,
        "model_device": str(next(model.parameters()).device),
        "model_training": model.training,
    }
    return stats.matrices, info


def bench(out: Path, devices: int, data: Path) -> dict:
    """Run the benchmark on ``devices`` processes; rank 0 returns the summary row (others: {})."""
    from anyedit_lightning.evaluation.loop import BenchmarkLoop
    from anyedit_lightning.evaluation.runner import BenchConfig, run_benchmark

    torch.set_num_threads(1)
    model = tiny_model("llama")
    tokenizer = build_tokenizer()
    # Every rank computes the (deterministic) statistics itself, in-process.
    corpus = [" ".join(r["answer"] + " " + r["question"] for r in json.loads(data.read_text())) * 10]
    stats = compute_covariance(
        model, tokenizer, LAYERS, corpus=corpus, max_tokens=2000, use_cache=False, trainer=False
    )
    config = BenchConfig(
        model="tiny-llama",
        preset="smollm2-135m-instruct",
        method="memit",
        anyedit=True,
        dataset=str(data),
        max_new_tokens=8,
        edit={"layers": LAYERS, "v_steps": 3},
        out=str(out),
        similarity=False,
        progress_bar=False,
    )
    fabric = L.Fabric(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto")
    edited: list[str] = []
    original = BenchmarkLoop.run_batch

    def recording_batch(self, batch):
        edited.extend(r.prompt for r in batch)
        return original(self, batch)

    BenchmarkLoop.run_batch = recording_batch
    try:
        row = run_benchmark(config, model, tokenizer, stats, fabric=fabric, report=False)
    finally:
        BenchmarkLoop.run_batch = original
    seen = {"rank": fabric.global_rank, "world": fabric.world_size, "requests": edited}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"seen.rank{fabric.global_rank}.json").write_text(json.dumps(seen))
    return row


if __name__ == "__main__":
    mode, out, devices = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    if mode == "stats":
        matrices, info = run(devices)
        torch.save({"matrices": matrices, "info": info}, out / f"rank{info['rank']}.pt")
    else:
        bench(out, devices, Path(sys.argv[4]))
