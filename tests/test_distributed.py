"""Multi-process runs under Lightning DDP on CPU (gloo): statistics and benchmark sharding (issue 8).

``strategy="ddp"`` re-runs the calling script once per extra rank, so the distributed halves run in
``tests/_ddp_worker.py`` through ``subprocess``; the single-process references run the same code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny import build_tokenizer, poet_records, tiny_model

from anyedit_lightning.stats.covariance import compute_covariance

WORKER = Path(__file__).resolve().parent / "_ddp_worker.py"

RECORDS = poet_records(4)

pytestmark = pytest.mark.usefixtures("one_thread")


def run_worker(*args: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(WORKER), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_ddp_statistics_equal_single_process(tmp_path: Path) -> None:
    import _ddp_worker

    single, info = _ddp_worker.run(1)
    run_worker("stats", str(tmp_path), "2", cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["info"]["rank"] for r in ranks] == [0, 1] and all(r["info"]["world"] == 2 for r in ranks)
    # Each rank saw only its shard, and together every batch once.
    seen = [r["info"]["batches_seen"] for r in ranks]
    assert all(s > 0 for s in seen) and sum(seen) == info["batches_total"] == info["batches_seen"]
    assert max(seen) < info["batches_total"]
    for rank in ranks:
        # The all-reduce happened: the token count is the whole corpus's, on every rank.
        assert rank["info"]["counts"] == info["counts"] and set(info["counts"].values()) == {
            _ddp_worker.MAX_TOKENS
        }
        assert rank["info"]["model_device"] == "cpu" and rank["info"]["model_training"] is False
        for layer, matrix in single.items():
            ddp = rank["matrices"][layer]
            assert ddp.dtype == torch.float64
            rel = ((ddp - matrix).norm() / matrix.norm()).item()
            assert rel < 1e-10, f"layer {layer}: relative difference {rel:.3e}"


def _without_timings(record: dict) -> dict:
    """A record minus its wall-clock fields (``seconds_*`` and the faithfulness ``seconds``), at any depth."""
    return {
        k: _without_timings(v) if isinstance(v, dict) else v
        for k, v in record.items()
        if not k.startswith("seconds")
    }


def test_benchmark_with_two_processes_matches_single_process(tmp_path: Path) -> None:
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    for devices in (1, 2):
        run_worker("bench", str(tmp_path / f"out{devices}"), str(devices), str(data), cwd=tmp_path)

    def predictions(out: Path) -> dict[str, dict]:
        records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines() if line]
        assert len(records) == len({r["index"] for r in records})  # no duplicates after the merge
        return {r["id"]: _without_timings(r) for r in records}

    single, merged = predictions(tmp_path / "out1"), predictions(tmp_path / "out2")
    assert sorted(single) == [r["id"] for r in RECORDS]
    assert merged == single
    assert not list((tmp_path / "out2").glob("predictions.rank*.jsonl"))  # rank files folded in
    seen = [json.loads((tmp_path / "out2" / f"seen.rank{r}.json").read_text()) for r in range(2)]
    shards = [set(s["requests"]) for s in seen]
    assert all(shards) and not shards[0] & shards[1]
    assert shards[0] | shards[1] == {r["question"] for r in RECORDS}


def test_spawned_workers_and_empty_shards_are_refused() -> None:
    model, tokenizer = tiny_model("llama"), build_tokenizer()
    options = dict(accelerator="cpu", devices=2, logger=False, enable_progress_bar=False)
    refusals = [("ddp_spawn", "ddp"), ("ddp", "1 batches for 2 processes")]
    for strategy, message in refusals:
        with pytest.raises(ValueError, match=message):
            compute_covariance(
                model,
                tokenizer,
                [1],
                corpus=["The capital of France is Paris. " * 20],
                max_tokens=64,
                use_cache=False,
                trainer=L.Trainer(strategy=strategy, **options),
            )


def test_cli_devices_flag_splits_requests_across_processes(tmp_path: Path) -> None:
    """``bench --devices 2`` (Lightning DDP on CPU) merges to the predictions of ``--devices 1``."""
    model_dir, data = tmp_path / "tiny-llama", tmp_path / "edits.json"
    tiny_model("llama").save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "ANYEDIT_CACHE": str(tmp_path / "cache"),
    }
    for devices in (1, 2):
        command = [
            sys.executable,
            "-m",
            "anyedit_lightning",
            "bench",
            "--model",
            str(model_dir),
            "--preset",
            "smollm2-135m-instruct",
            "--method",
            "memit",
            "--dataset",
            str(data),
            "--edit",
            '{"layers": [1, 2], "v_steps": 3}',
            "--stats_tokens",
            "1500",
            "--max_new_tokens",
            "8",
            "--similarity",
            "false",
            "--progress_bar",
            "false",
            "--accelerator",
            "cpu",
            "--devices",
            str(devices),
            "--out",
            str(tmp_path / f"out{devices}"),
        ]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def predictions(out: Path) -> dict[str, dict]:
        records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines() if line]
        return {r["id"]: _without_timings(r) for r in records}

    single, merged = predictions(tmp_path / "out1"), predictions(tmp_path / "out2")
    assert sorted(single) == [r["id"] for r in RECORDS]
    assert merged == single
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert summary["results"][0]["config"]["devices"] == 2
