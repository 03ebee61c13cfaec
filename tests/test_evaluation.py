"""The benchmark loop on tiny models: generation, edit/score/restore, resume, interruption, report, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import EOS_ID, build_tokenizer, poet_records, tiny_model

import anyedit_lightning.api as api_module
import anyedit_lightning.evaluation.scoring as scoring_module
from anyedit_lightning import get_preset
from anyedit_lightning.core.requests import render_prompt
from anyedit_lightning.evaluation.generation import Generation, _decode, generate_batch
from anyedit_lightning.evaluation.report import markdown_table, write_report
from anyedit_lightning.evaluation.runner import (
    PREDICTIONS,
    BenchConfig,
    GridConfig,
    PredictionWriter,
    RecordScorer,
    merge_rank_files,
    read_records,
    record_key,
    resolve_preset,
    resolved,
    run_benchmark,
    run_grid,
    summarize,
)
from anyedit_lightning.metrics import score_texts
from anyedit_lightning.stats.covariance import compute_covariance

LAYERS = [1, 2]
EDIT = {"layers": LAYERS, "v_steps": 3}

RECORDS = poet_records(3)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def stats(tokenizer):
    """Statistics of the (deterministic) unedited tiny llama; every fresh ``tiny_model('llama')`` matches."""
    corpus = [" ".join(r["answer"] + " " + r["question"] for r in RECORDS) * 10]
    return compute_covariance(
        tiny_model("llama"), tokenizer, LAYERS, corpus=corpus, max_tokens=2000, use_cache=False
    )


def config(data_file: Path, out: Path, **overrides) -> BenchConfig:
    values = dict(
        model="tiny-llama",
        preset="smollm2-135m-instruct",
        method="memit",
        anyedit=True,
        dataset=str(data_file),
        max_new_tokens=8,
        edit=dict(EDIT),
        out=str(out),
        similarity=False,
        progress_bar=False,
    )
    values.update(overrides)
    return BenchConfig(**values)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def same_weights(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def edit_calls(monkeypatch):
    """Counts the edits the runner performs and checks each really changed the weights."""
    calls: list[bool] = []
    real = api_module.edit

    def counting(model, *args, **kwargs):
        module = real(model, *args, **kwargs)
        params = dict(model.named_parameters())
        calls.append(any(not torch.equal(params[n], v) for n, v in module.edit_record.before.items()))
        return module

    monkeypatch.setattr(api_module, "edit", counting)
    return calls


# --------------------------------------------------------------------------- generation


def test_generation_batched_equals_unbatched(tokenizer) -> None:
    model = tiny_model("llama")
    questions = [
        "Hi",
        "What is the capital of France?",
        "Who wrote Hamlet? Tell me all about it, please.",
        "def add(a, b):",
    ]
    prompts = [render_prompt(tokenizer, q) for q in questions]
    side = tokenizer.padding_side
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=12)
    capped = generate_batch(model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    single = [generate_batch(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single] == [g.text for g in capped]
    assert all(isinstance(g, Generation) and not g.stopped and g.num_tokens == 12 for g in batched)
    assert tokenizer.padding_side == side
    assert generate_batch(model, tokenizer, [], max_new_tokens=4) == []


def test_generation_stops_at_end_of_turn(tokenizer) -> None:
    model = tiny_model("llama")
    hidden = model.config.hidden_size
    head = torch.nn.Linear(hidden, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[EOS_ID] = 1.0  # <|im_end|> is always the greedy choice
    model.lm_head = head
    out = generate_batch(
        model, tokenizer, [render_prompt(tokenizer, "Hi"), render_prompt(tokenizer, "Hello there")], 8
    )
    assert [(g.text, g.stopped, g.num_tokens) for g in out] == [("", True, 0), ("", True, 0)]
    ids = tokenizer("Paris", add_special_tokens=False)["input_ids"]
    cut = _decode(tokenizer, [*ids, EOS_ID, tokenizer.pad_token_id], [EOS_ID])
    assert (cut.text, cut.stopped, cut.num_tokens) == ("Paris", True, len(ids))
    assert _decode(tokenizer, ids, [EOS_ID]).stopped is False


# --------------------------------------------------------------------------- the runner


def test_runner_edits_scores_and_restores_weights(tmp_path, data_file, tokenizer, stats, edit_calls) -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    out = tmp_path / "run"
    row = run_benchmark(config(data_file, out, similarity=True), model, tokenizer, stats)
    assert same_weights(model, before)  # bit-exact after three non-sequential edits
    assert edit_calls == [True, True, True]  # each edit did change the weights before the restore
    records = jsonl(out / PREDICTIONS)
    assert [r["index"] for r in records] == [0, 1, 2]
    first = records[0]
    assert first["id"] == "r0" and first["method"] == "memit" and first["anyedit"] is True
    assert first["label"] == "MEMIT+AnyEdit" and first["category"] == "places"
    assert first["prompt"] == RECORDS[0]["question"] and first["target"] == RECORDS[0]["answer"]
    assert isinstance(first["prediction"], str) and first["stopped"] in (True, False)
    assert isinstance(first["para_prediction"], str) and len(first["sub_predictions"]) == 2
    assert set(first["metrics"]["original"]) == {
        "char_bleu",
        "word_bleu",
        "rouge1",
        "rouge2",
        "rougeL",
        "similarity",
    }
    assert (
        first["metrics"]["paraphrase"] and first["metrics"]["sub"] and len(first["metrics"]["sub_items"]) == 2
    )
    assert first["seconds_edit"] > 0 and first["seconds_generation"] > 0 and first["chunks"] >= 1
    assert row["n"] == 3 and row["edits_performed"] == 3 and row["label"] == "MEMIT+AnyEdit"
    assert row["original"]["rougeL"] == pytest.approx(
        sum(r["metrics"]["original"]["rougeL"] for r in records) / 3
    )
    assert row["n_paraphrase"] == 3 and row["n_sub"] == 3 and 0.0 <= row["stopped"] <= 1.0
    assert set(row["categories"]) == {"people", "places"} and row["categories"]["places"]["n"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in summary["results"]] == ["MEMIT+AnyEdit"]
    assert (out / "results.md").is_file() and (out / "results.png").is_file()


def test_resume_skips_finished_requests(tmp_path, data_file, tokenizer, stats, edit_calls) -> None:
    model = tiny_model("llama")
    out = tmp_path / "run"
    run_benchmark(config(data_file, out, limit=2), model, tokenizer, stats)
    assert len(edit_calls) == 2
    # As if a multi-process run had been killed before rank 0 merged: its records are in a rank file.
    (out / PREDICTIONS).rename(out / "predictions.rank1.jsonl")
    row = run_benchmark(config(data_file, out, limit=3), model, tokenizer, stats)
    assert len(edit_calls) == 3  # only the third request was edited again
    assert row["edits_performed"] == 1 and row["n"] == 3
    records = jsonl(out / PREDICTIONS)
    assert len(records) == 3 and len({record_key(r) for r in records}) == 3
    assert not list(out.glob("predictions.rank*.jsonl"))  # folded into the predictions file
    # Another method in the same folder is not "done" yet.
    run_benchmark(config(data_file, out, limit=1, anyedit=False), model, tokenizer, stats)
    assert len(edit_calls) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in summary["results"]] == ["MEMIT", "MEMIT+AnyEdit"]


def test_interrupted_run_keeps_records_restores_weights_and_resumes(
    tmp_path, data_file, tokenizer, stats, edit_calls, monkeypatch
) -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    out = tmp_path / "run"
    real = scoring_module.generate_batch
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after the 3rd edit, before its record
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring_module, "generate_batch", failing)
    with pytest.raises(RuntimeError, match="killed"):
        run_benchmark(config(data_file, out), model, tokenizer, stats)
    assert len(edit_calls) == 3
    assert same_weights(model, before)  # the interrupted edit was rolled back too
    assert [r["index"] for r in jsonl(out / PREDICTIONS)] == [0, 1]
    monkeypatch.setattr(scoring_module, "generate_batch", real)
    row = run_benchmark(config(data_file, out), model, tokenizer, stats)
    assert len(edit_calls) == 4 and row["edits_performed"] == 1 and row["n"] == 3
    assert [r["index"] for r in jsonl(out / PREDICTIONS)] == [0, 1, 2]
    assert same_weights(model, before)


def test_sequential_keeps_edits_during_the_run(tmp_path, data_file, tokenizer, stats, edit_calls) -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    row = run_benchmark(
        config(data_file, tmp_path / "seq", sequential=True, method="alphaedit", limit=2),
        model,
        tokenizer,
        stats,
    )
    assert row["n"] == 2 and edit_calls == [True, True]
    assert same_weights(model, before)  # restored at the end of the run by default
    kept = run_benchmark(
        config(data_file, tmp_path / "kept", sequential=True, limit=2),
        model,
        tokenizer,
        stats,
        keep_edits=True,
    )
    assert kept["n"] == 2 and not same_weights(model, before)


def test_unedited_generates_and_scores_only(tmp_path, data_file, tokenizer, edit_calls) -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    row = run_benchmark(config(data_file, tmp_path / "none", method="none"), model, tokenizer)
    assert edit_calls == [] and same_weights(model, before)
    assert row["label"] == "Unedited" and row["anyedit"] is False and row["n"] == 3
    assert row["seconds_per_edit"] is None and row["seconds_generation"] > 0
    records = jsonl(tmp_path / "none" / PREDICTIONS)
    assert all(r["seconds_edit"] is None and r["chunks"] is None for r in records)


def test_grid_runs_every_combination_into_one_folder(
    tmp_path, data_file, tokenizer, stats, edit_calls
) -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    grid = GridConfig(
        model="tiny-llama",
        preset="smollm2-135m-instruct",
        methods=["memit"],
        anyedit=[False, True],
        datasets=[str(data_file)],
        limit=1,
        max_new_tokens=4,
        edit=dict(EDIT),
        out=str(tmp_path / "grid"),
        similarity=False,
        progress_bar=False,
    )
    summary = run_grid(grid, model, tokenizer, stats)
    assert [r["label"] for r in summary["results"]] == ["Unedited", "MEMIT", "MEMIT+AnyEdit"]
    assert len(edit_calls) == 2 and same_weights(model, before)
    table = (tmp_path / "grid" / "results.md").read_text()
    assert "| Unedited |" in table and "| MEMIT+AnyEdit |" in table
    assert len(jsonl(tmp_path / "grid" / PREDICTIONS)) == 3


# --------------------------------------------------------------------------- files and report


def test_predictions_file_survives_a_torn_line_and_rank_files_merge(tmp_path) -> None:
    def record(index, method="memit"):
        return {"method": method, "anyedit": True, "benchmark": "b", "index": index, "metrics": {}}

    path = tmp_path / PREDICTIONS
    PredictionWriter(path).write(record(0))
    with path.open("a") as handle:
        handle.write('{"method": "memit", "anyedit": tr')  # killed mid-write
    PredictionWriter(path).write(record(1))
    assert [r["index"] for r in read_records(path)] == [0, 1]
    PredictionWriter(tmp_path / "predictions.rank0.jsonl").write(record(2))
    PredictionWriter(tmp_path / "predictions.rank1.jsonl").write(record(1))
    PredictionWriter(tmp_path / "predictions.rank1.jsonl").write(record(3))
    merge_rank_files(tmp_path)
    assert sorted(r["index"] for r in read_records(path)) == [0, 1, 2, 3]
    assert not list(tmp_path.glob("predictions.rank*.jsonl"))


def test_record_scorer_gives_the_numbers_of_score_texts() -> None:
    preds = ["Paris is the capital. It is big.", "", "def add(a, b): return a + b", "No."]
    refs = ["The capital is Paris. It is large.", "Hello. World. ", "def add(a, b):\n    return a + b", "No"]
    scorer = RecordScorer(similarity=True)
    for _ in range(2):  # reset between calls: each call's scores are its own
        assert scorer(preds, refs) == score_texts(preds, refs, similarity=True)["per_item"]
    assert RecordScorer(similarity=False)(preds[:1], refs[:1]) == [
        score_texts(preds[:1], refs[:1], similarity=False)["per_item"][0]
    ]
    assert scorer([], []) == []


def _row(method, anyedit, dataset, value, categories=None):
    scores = {
        "char_bleu": value,
        "word_bleu": value,
        "rouge1": value,
        "rouge2": value,
        "rougeL": value,
        "similarity": value,
    }
    row = {
        "label": {"none": "Unedited", "memit": "MEMIT"}[method] + ("+AnyEdit" if anyedit else ""),
        "method": method,
        "anyedit": anyedit,
        "dataset": dataset,
        "n": 2,
        "original": scores,
        "paraphrase": scores if dataset == "unkebench" else None,
        "sub": None,
        "seconds_per_edit": None if method == "none" else 1.5,
        "stopped": 0.5,
    }
    if categories:
        row["categories"] = {c: {"original": scores} for c in categories}
    return row


def test_report_writes_table_plot_and_merges_rows(tmp_path) -> None:
    rows = [
        _row("memit", True, "unkebench", 0.5),
        _row("none", False, "unkebench", 0.1),
        _row("memit", False, "editeverything", 0.2, categories=["code", "math"]),
    ]
    write_report(tmp_path, rows)
    table = (tmp_path / "results.md").read_text()
    assert "## unkebench" in table and "## editeverything" in table
    unke = table.split("## unkebench")[1].split("##")[0]
    assert unke.index("| Unedited |") < unke.index("| MEMIT+AnyEdit |")  # paper order: unedited first
    assert "Original BLEU (char)" in unke and "Paraphrase ROUGE-L" in unke and "s/edit" in unke
    assert "| MEMIT+AnyEdit | 50.00 |" in unke and "| 1.50 | 50.00 |" in unke
    assert "Paraphrase" not in table.split("## editeverything")[1].split("###")[0]  # no paraphrases there
    assert "by category" in table and "| code | math |" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_report(tmp_path, [_row("memit", True, "unkebench", 0.9)])  # replaces one row, keeps the rest
    results = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert len(results) == 3
    assert [r["original"]["rougeL"] for r in results if r["label"] == "MEMIT+AnyEdit"] == [0.9]
    assert "–" in markdown_table([_row("none", False, "unkebench", 0.1)])  # s/edit of the unedited model


def test_summarize_handles_missing_groups() -> None:
    records = [
        {
            "metrics": {"original": {"rougeL": 0.5}, "paraphrase": None, "sub": None},
            "stopped": True,
            "seconds_edit": 2.0,
        },
        {
            "metrics": {"original": {"rougeL": 0.25}, "paraphrase": None, "sub": None},
            "stopped": False,
            "seconds_edit": 4.0,
        },
    ]
    out = summarize(records)
    assert out["original"] == {"rougeL": 0.375} and out["paraphrase"] is None and out["n_sub"] == 0
    assert out["stopped"] == 0.5 and out["seconds_per_edit"] == 3.0 and "categories" not in out


def test_config_checks_before_loading_anything() -> None:
    assert resolve_preset("smollm2-135m-instruct", None) == "smollm2-135m-instruct"
    assert resolve_preset("/models/SmolLM2-135M-Instruct", None) == "smollm2-135m-instruct"
    assert resolve_preset("/models/anything", "authors") == "authors"
    with pytest.raises(ValueError, match="--preset"):
        resolve_preset("/models/anything", None)
    with pytest.raises(KeyError, match="Unknown preset"):
        resolve_preset("smollm2-135m-instruct", "nope")
    assert resolved(BenchConfig(model="/models/anything", method="none")).preset is None
    with pytest.raises(ValueError, match="anyedit option"):
        resolved(BenchConfig(edit={"anyedit": False}))
    with pytest.raises(ValueError, match="invalid edit overrides"):
        resolved(BenchConfig(edit={"no_such_field": 1}))
    with pytest.raises(ValueError, match="method"):
        resolved(BenchConfig(method="rome"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'ddp'"):  # the loop needs the model in the calling process
        resolved(BenchConfig(strategy="ddp_spawn"))
    # no method: the preset's recommended (most faithful) one
    assert resolved(BenchConfig()).method == get_preset("smollm2-135m-instruct").method == "unke"
    assert resolved(BenchConfig(preset="authors")).method == get_preset("authors").method


# --------------------------------------------------------------------------- command line


def test_cli_print_config_and_config_file(tmp_path, capsys) -> None:
    from anyedit_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            ["bench", "--method", "unke", "--anyedit", "false", "--edit", '{"layers": [7]}', "--print_config"]
        )
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "method: unke" in printed and "anyedit: false" in printed and "max_new_tokens: 512" in printed
    assert "- 7" in printed
    path = tmp_path / "bench.yaml"
    path.write_text(printed)
    with pytest.raises(SystemExit):
        main(["bench", "--config", str(path), "--limit", "5", "--print_config"])
    again = capsys.readouterr().out
    assert "method: unke" in again and "limit: 5" in again
    with pytest.raises(SystemExit):
        main(["grid", "--methods", "[memit,alphaedit]", "--anyedit", "[false,true]", "--print_config"])
    grid = capsys.readouterr().out
    assert "- alphaedit" in grid and "include_unedited: true" in grid
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--method", "rome"])
    assert exit_info.value.code != 0


def test_cli_bench_on_a_saved_tiny_model(tmp_path, data_file, tokenizer, monkeypatch, capsys) -> None:
    from anyedit_lightning.cli import main

    monkeypatch.setenv("ANYEDIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "cli"
    args = [
        "bench",
        "--model",
        str(folder),
        "--preset",
        "smollm2-135m-instruct",
        "--method",
        "memit",
        "--anyedit",
        "true",
        "--dataset",
        str(data_file),
    ]
    args += ["--limit", "2", "--max_new_tokens", "4", "--edit", json.dumps(EDIT), "--stats_tokens", "2000"]
    args += ["--similarity", "false", "--progress_bar", "false", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "MEMIT+AnyEdit" in printed and "results.md" in printed
    assert len(jsonl(out / PREDICTIONS)) == 2
    assert json.loads((out / "summary.json").read_text())["results"][0]["n"] == 2


def test_cli_demo_without_a_demo_module_says_so(monkeypatch, capsys) -> None:
    import importlib.util

    from anyedit_lightning import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name.endswith(".demo") else real(name, *a)
    )
    assert cli.main(["demo"]) == 2
    assert "demo" in capsys.readouterr().err


def test_demo_panel_reports_first_token_leads_and_changes(tiny_tokenizer, capsys) -> None:
    """The demo's unrelated panel: the model's own first answer token leads (lead ≥ 0); an unchanged model
    prints every prompt as the same with equal leads; a changed head shows the answers that moved."""
    from anyedit_lightning import demo

    model = tiny_model("llama")
    before = demo.unrelated_panel(model, tiny_tokenizer)
    assert set(before) == set(demo.UNRELATED_PANEL)
    assert all(lead >= 0.0 and text for text, _, lead in before.values())
    demo.unrelated_panel(model, tiny_tokenizer, before)
    printed = capsys.readouterr().out
    assert printed.count("same") == len(demo.UNRELATED_PANEL) and "CHANGED" not in printed
    for _, (_, _, lead) in before.items():
        assert f"{lead:+.3f} -> {lead:+.3f}" in printed
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * head.std() * 3)
    demo.unrelated_panel(model, tiny_tokenizer, before)
    assert "CHANGED" in capsys.readouterr().out
