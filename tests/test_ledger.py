"""The edit ledger (docs/algorithm.md §4.6) on tiny models: retention, reverts, patches, the CLI."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny import build_tokenizer, tiny_model

from anyedit_lightning import EditPatch, apply_patches, edit, edit_sequentially, weights_fingerprint
from anyedit_lightning.core.hooks import record_inputs, record_outputs
from anyedit_lightning.core.ledger import ledger_of
from anyedit_lightning.core.requests import EditRequest
from anyedit_lightning.models.registry import resolve_architecture
from anyedit_lightning.patches import PatchMismatchError, patch_path

pytestmark = pytest.mark.usefixtures("one_thread")

REQUESTS = [
    EditRequest(
        "Who is Ada Quill?", "Ada Quill is a glassblower from Vormund who built the first tide clock."
    ),
    EditRequest("What is Zorbl?", "Zorbl is a purple river that flows uphill every spring."),
    EditRequest("Where is Kelmar?", "Kelmar is a town of bell makers on the north shore of Lake Osk."),
]
TEXTS = [
    "The capital of France is Paris. The Eiffel Tower is in Paris, on the Seine.",
    "Who wrote Hamlet? William Shakespeare wrote Hamlet; he was an English poet and playwright.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
]
LAYER = 2
#: A small, strong UnKE write on the tiny models (the preset's layer 12 does not exist there). The δ bound
#: is pinned: at UnKE's preset 0.75 the tiny layer's residuals are so small that AdamW at these tests'
#: lr 1e-2 takes full-size steps on near-zero gradients and the second, retaining write diverged (drift
#: 12.7x; 0.065 at lr 3e-3), which says nothing about retention.
EDIT = dict(
    preset="smollm2-135m-instruct",
    layers=[LAYER],
    window=16,
    v_steps=4,
    clamp=1.0,
    trainer_kwargs=dict(enable_progress_bar=False, logger=False),
)


def writer(**overrides):
    return {"preservation_texts": TEXTS, "steps": 30, "lr": 1e-2, **overrides}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def layer_outputs(model, tok, ids: torch.Tensor) -> torch.Tensor:
    handle = resolve_architecture(model)
    with torch.no_grad(), record_outputs({"l": handle.layer(LAYER)}) as outs:
        model(input_ids=ids[None], use_cache=False)
    return outs.values["l"][0].float()


def test_each_write_records_its_requests_and_outputs(tok):
    model = tiny_model("llama")
    base = weights_fingerprint(model)
    edit(model, tok, REQUESTS[:2], method="unke", writer_kwargs=writer(steps=3), **EDIT)
    (entry,) = ledger_of(model).entries
    assert (entry.base, entry.result) == (base, weights_fingerprint(model))
    assert len(entry.sequences) == 2 and list(entry.outputs) == [LAYER]
    for ids, out in zip(entry.sequences, entry.outputs[LAYER]):
        assert out.shape == (len(ids), model.config.hidden_size)
        torch.testing.assert_close(out, layer_outputs(model, tok, ids), rtol=1e-5, atol=1e-5)


def test_a_retaining_write_keeps_the_earlier_edit_in_the_layer(tok):
    """The second edit moves the layer's outputs on the first edit's text far less when it retains
    (preserving against the current layer, so that only the retention term differs). Both first keys on
    the shared "?" (``content_end``) make the second write overwrite the first most; float32 keeps the fit
    the same on every CPU (``compute_dtype="auto"`` would pick bf16 on some)."""
    drift = {}
    for retain in (False, True):
        model = tiny_model("llama")
        options = writer(retain=retain, preserve_original=False, compute_dtype=None)
        edit(model, tok, REQUESTS[0], method="unke", writer_kwargs=options, first_key="content_end", **EDIT)
        (entry,) = ledger_of(model).entries
        edit(model, tok, REQUESTS[1], method="unke", writer_kwargs=options, first_key="content_end", **EDIT)
        after = layer_outputs(model, tok, entry.sequences[0])
        recorded = entry.outputs[LAYER][0]
        drift[retain] = float((after - recorded).norm() / recorded.norm())
    assert drift[True] < drift[False] / 2, drift


def test_reverts_and_restores_cut_the_ledger_back(tok):
    model = tiny_model("llama")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    patches = edit_sequentially(
        model, tok, REQUESTS[:2], method="unke", writer_kwargs=writer(steps=3), **EDIT
    )
    ledger = ledger_of(model)
    assert [e.result for e in ledger.entries] == [p.result_fingerprint for p in patches]
    patches[1].revert(model)
    assert [e.result for e in ledger.entries] == [patches[0].result_fingerprint]
    patches[0].revert(model)
    assert len(ledger) == 0
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())  # bit-exact
    # a snapshot restored by hand (as the benchmark loop does between records): the next edit notices
    module = edit(model, tok, REQUESTS[0], method="unke", writer_kwargs=writer(steps=3), **EDIT)
    with torch.no_grad():
        for name, value in module.edit_record.before.items():
            model.get_parameter(name).copy_(value)
    edit(model, tok, REQUESTS[1], method="unke", writer_kwargs=writer(steps=3), **EDIT)
    (entry,) = ledger.entries
    assert entry.base == weights_fingerprint(tiny_model("llama"))


def test_weights_changed_outside_the_library_empty_the_ledger(tok, caplog):
    model = tiny_model("llama")
    edit(model, tok, REQUESTS[0], method="unke", writer_kwargs=writer(steps=3), **EDIT)
    with torch.no_grad():
        model.get_parameter("lm_head.weight").mul_(1.01)
    with caplog.at_level(logging.WARNING, logger="anyedit_lightning.core.ledger"):
        edit(model, tok, REQUESTS[1], method="unke", writer_kwargs=writer(steps=3), **EDIT)
    assert "match none of the 1 edits" in caplog.text
    assert len(ledger_of(model)) == 1  # only the new edit


def test_saved_patches_continue_the_chain_like_one_run(tok, tmp_path):
    """Edit 3 requests in one run; or edit 2 saving the patches as they come, apply them to a fresh model
    (a new process would) and edit the third: the same weights, bit for bit, and the same saved files."""
    one_run = tiny_model("llama")
    kwargs = dict(method="unke", writer_kwargs=writer(steps=5), **EDIT)
    edit_sequentially(one_run, tok, REQUESTS, patch_dir=tmp_path / "one", **kwargs)
    edit_sequentially(tiny_model("llama"), tok, REQUESTS[:2], patch_dir=tmp_path / "split", **kwargs)
    resumed = tiny_model("llama")
    assert len(apply_patches(resumed, tmp_path / "split")) == 2 and len(ledger_of(resumed)) == 2
    edit_sequentially(resumed, tok, REQUESTS[2:], patch_dir=tmp_path / "split", **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(one_run.parameters(), resumed.parameters(), strict=True))
    names = sorted(p.name for p in (tmp_path / "split").iterdir())
    assert (
        names
        == sorted(p.name for p in (tmp_path / "one").iterdir())
        == [patch_path(".", n).name for n in (1, 2, 3)]
    )
    again = tiny_model("llama")
    apply_patches(again, tmp_path / "split", count=3)
    assert weights_fingerprint(again) == weights_fingerprint(one_run)


def test_apply_patches_refuses_a_broken_run_and_writes_nothing(tok, tmp_path):
    kwargs = dict(method="unke", writer_kwargs=writer(steps=2), **EDIT)
    edit_sequentially(tiny_model("llama"), tok, REQUESTS[:2], patch_dir=tmp_path / "a", **kwargs)
    edit_sequentially(tiny_model("llama"), tok, REQUESTS[1:], patch_dir=tmp_path / "b", **kwargs)
    model = tiny_model("llama")
    before = weights_fingerprint(model)
    with pytest.raises(FileNotFoundError, match="in sequence"):
        apply_patches(model, tmp_path / "a", count=3)
    with pytest.raises(FileNotFoundError, match="in sequence"):
        apply_patches(model, tmp_path / "empty")
    (tmp_path / "a" / patch_path(".", 2).name).unlink()
    (tmp_path / "b" / patch_path(".", 2).name).rename(tmp_path / "a" / patch_path(".", 2).name)
    with pytest.raises(PatchMismatchError, match="mixes two runs"):
        apply_patches(model, tmp_path / "a")
    with pytest.raises(PatchMismatchError, match="Refusing to apply"):
        apply_patches(tiny_model("llama", seed=1), tmp_path / "b")
    assert weights_fingerprint(model) == before and len(ledger_of(model)) == 0


def test_edit_sequentially_batches_requests(tok):
    model = tiny_model("llama")
    patches = edit_sequentially(
        model, tok, REQUESTS, method="unke", batch_size=2, writer_kwargs=writer(steps=3), **EDIT
    )
    assert [len(p.requests) for p in patches] == [2, 1]
    assert [len(e.sequences) for e in ledger_of(model).entries] == [2, 1]
    with pytest.raises(ValueError, match="batch_size"):
        edit_sequentially(model, tok, REQUESTS, method="unke", batch_size=0, **EDIT)


def test_retention_command_writes_its_table(tok, tmp_path, monkeypatch):
    from anyedit_lightning.evaluation import retention

    data = tmp_path / "records.json"
    data.write_text(json.dumps([{"question": r.prompt, "answer": r.target} for r in REQUESTS]))
    monkeypatch.setattr(retention, "load_for", lambda config: (tiny_model("llama"), tok))
    config = retention.RetentionConfig(
        dataset=str(data),
        split="all",
        limit=3,
        checkpoints=[1, 3],
        max_new_tokens=8,
        faithfulness=False,
        edit={"layers": [LAYER], "window": 16, "v_steps": 2},
        writer=writer(steps=2),
        progress_bar=False,
        out=str(tmp_path / "out"),
    )
    rows = retention.run_retention(config)
    assert [r["edits"] for r in rows] == [1, 3] and len(rows[-1]["per_edit"]) == 3
    assert (
        len(rows[-1]["seconds_per_edit"]) == 3
        and rows[-1]["seconds_per_edit"][-1] == rows[-1]["edit_seconds"]
    )
    assert all(0.0 <= r["rouge_l"] <= 1.0 for r in rows)
    table = (tmp_path / "out" / "retention.md").read_text()
    assert table.count("\n| ") == 3 and (tmp_path / "out" / "retention.png").stat().st_size > 0


def test_retention_resumes_from_saved_patches_like_one_run(tok, tmp_path, monkeypatch):
    """Stop after 2 edits, continue in a 'new process' from the saved patches: the rows after the resume
    are the one run's (scores, not seconds); a resume on other records is refused, the model untouched."""
    from anyedit_lightning.evaluation import retention

    data = tmp_path / "records.json"
    data.write_text(json.dumps([{"question": r.prompt, "answer": r.target} for r in REQUESTS]))
    models = []
    monkeypatch.setattr(
        retention, "load_for", lambda config: (models.append(tiny_model("llama")) or models[-1], tok)
    )
    base = dict(
        dataset=str(data),
        split="all",
        max_new_tokens=8,
        faithfulness=False,
        edit={"layers": [LAYER], "window": 16, "v_steps": 2},
        writer=writer(steps=2),
        progress_bar=False,
    )

    def run(**options):
        return retention.run_retention(retention.RetentionConfig(**base, **options))

    one = run(limit=3, checkpoints=[2, 3], out=str(tmp_path / "one"))
    run(limit=2, patch_dir=str(tmp_path / "patches"), out=str(tmp_path / "first"))
    rest = run(limit=3, checkpoints=[2, 3], resume_from=str(tmp_path / "patches"), out=str(tmp_path / "rest"))
    scores = ("rouge_l", "per_edit", "stopped")
    assert [r["edits"] for r in rest] == [2, 3] and rest[0]["edit_seconds"] is None
    assert [[r[k] for k in scores] for r in rest] == [[r[k] for k in scores] for r in one]
    assert weights_fingerprint(models[-1]) == weights_fingerprint(models[0])
    with pytest.raises(ValueError, match="not this run's first"):
        run(start=1, limit=2, resume_from=str(tmp_path / "patches"), out=str(tmp_path / "wrong"))
    assert weights_fingerprint(models[-1]) == weights_fingerprint(tiny_model("llama"))
    with pytest.raises(ValueError, match="sequential"):
        run(mode="batch", limit=2, resume_from=str(tmp_path / "patches"), out=str(tmp_path / "batch"))


def test_preservation_against_the_original_layer_stops_drift_adding_up(tok):
    """Three kept edits: the layer's outputs on the preservation texts stay closer to the unedited
    layer's when each write preserves against the ledger's anchor than against the current layer.

    A gentle, float32 fit (lr 3e-3): at the other tests' lr 1e-2 AdamW's steps on near-zero gradients
    make the tiny layer drift by half its norm or more, and which way the comparison falls then depends
    on the CPU's rounding. At 3e-3 the anchor removes 22-23 % of the drift with every step count,
    preservation weight and compute dtype tried."""
    ids = torch.tensor(tok(" ".join(TEXTS), add_special_tokens=False)["input_ids"][:48])
    original = layer_outputs(tiny_model("llama"), tok, ids)
    drift = {}
    for anchored in (False, True):
        model = tiny_model("llama")
        options = writer(preserve_original=anchored, preservation_weight=4.0, lr=3e-3, compute_dtype=None)
        edit_sequentially(model, tok, REQUESTS, method="unke", writer_kwargs=options, **EDIT)
        assert set(ledger_of(model).anchors()) == {n for n, _ in model.named_parameters() if ".2." in n}
        drift[anchored] = float((layer_outputs(model, tok, ids) - original).norm() / original.norm())
    assert drift[True] < 0.85 * drift[False], drift


# ---- closed-form writes (MEMIT, AlphaEdit): every kept edit solved again, jointly ----------------

#: MEMIT at one layer of a tiny model whose MLP is wider (256) than the edited positions, λ = 1.
CLOSED = dict(EDIT, layers=[LAYER], v_steps=6)
CLOSED_WRITER = {"mom2_weight": 1.0}


@pytest.fixture(scope="module")
def unedited_stats(tok):
    from anyedit_lightning.stats.covariance import compute_covariance

    model = tiny_model("llama", intermediate=256)
    return compute_covariance(model, tok, [LAYER], corpus=TEXTS * 6, max_tokens=3000, use_cache=False)


def closed_edits(tok, stats, requests, model=None, method="memit", **writer_kwargs):
    model = model if model is not None else tiny_model("llama", intermediate=256)
    options = {**(CLOSED_WRITER if method == "memit" else {}), **writer_kwargs}
    patches = edit_sequentially(
        model, tok, requests, method=method, stats=stats, writer_kwargs=options, **CLOSED
    )
    return model, patches


def down_proj(model) -> torch.Tensor:
    return model.get_parameter(f"model.layers.{LAYER}.mlp.down_proj.weight").detach().double()


def alphaedit_options(stats) -> dict:
    """A null space of half the dimensions and a light α, so that AlphaEdit's write takes here."""
    return {"threshold": float(torch.linalg.eigvalsh(stats[LAYER].double()).median()), "l2": 0.1}


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_a_ledger_resolve_reproduces_the_batch_write(method, tok, unedited_stats):
    """Two kept edits: the weights equal the method's closed form for both requests' keys and targets,
    solved at once from the unedited layer (docs/algorithm.md §4.3; computed here, not by the writer)."""
    options = alphaedit_options(unedited_stats) if method == "alphaedit" else {}
    model, _ = closed_edits(tok, unedited_stats, REQUESTS[:2], method=method, **options)
    entries = ledger_of(model).entries
    assert all(e.fit is not None and e.fit.method == method for e in entries)
    fresh = tiny_model("llama", intermediate=256)
    handle = resolve_architecture(fresh)
    K, K_p, R = [], [], []
    for request in (r for e in entries for r in e.keyed()):
        with (
            torch.no_grad(),
            record_inputs({"k": handle.down_proj(LAYER)}) as ins,
            record_outputs({"h": handle.layer(LAYER)}) as outs,
        ):
            fresh(input_ids=torch.tensor([request.ids]), use_cache=False)
        keys, h = ins.values["k"][0].double(), outs.values["h"][0].double()
        is_key = torch.zeros(len(request.ids), dtype=torch.bool)
        is_key[request.keys] = True
        K.append(keys[is_key])
        K_p.append(keys[~is_key])
        R.append(request.targets.double() - h[is_key])
    K, K_p, R = torch.cat(K), torch.cat(K_p), torch.cat(R)
    C = unedited_stats[LAYER].double()
    if method == "memit":
        expected = torch.linalg.solve(CLOSED_WRITER["mom2_weight"] * C + K.T @ K + K_p.T @ K_p, K.T @ R).T
    else:
        values, vectors = torch.linalg.eigh(C)
        null = vectors[:, values < options["threshold"]]
        P, eye = null @ null.T, torch.eye(len(C), dtype=C.dtype)
        expected = torch.linalg.solve(P @ (K.T @ K + K_p.T @ K_p) + options["l2"] * eye, P @ K.T @ R).T
    written = down_proj(model) - down_proj(fresh)
    # the solve's condition number is ~1e7 here (barely active MLP units): compare norms, not elements
    assert float((written - expected).norm() / expected.norm()) < 1e-4
    assert float(((written - expected) @ K.T).norm() / (expected @ K.T).norm()) < 1e-5


def test_a_memit_write_keeps_the_earlier_edit(tok, unedited_stats):
    """After a second edit, the share of the first edit's residual ``‖Z − H‖`` left at its keys: far
    smaller when the write re-solves both (``retain=True``) than when it writes on top. (On this
    byte-level tiny model a request's keys nearly repeat the other's preserved positions, so even the
    joint solve leaves much of it; docs/results/retention.md measures SmolLM2.)"""
    left = {}
    unedited = tiny_model("llama", intermediate=256)
    for retain in (False, True):
        model, _ = closed_edits(tok, unedited_stats, REQUESTS[:2], retain=retain)
        (first,) = ledger_of(model).entries[0].keyed()
        ids, Z = torch.tensor(first.ids), first.targets.double()
        h, h0 = (layer_outputs(m, tok, ids)[first.keys].double() for m in (model, unedited))
        left[retain] = float((h - Z).norm() / (h0 - Z).norm())
    assert left[True] < left[False] / 10, left


def test_closed_form_edits_continue_from_saved_patches_and_revert_exactly(tok, unedited_stats, tmp_path):
    one_run, patches = closed_edits(tok, unedited_stats, REQUESTS)
    after_two = {n: p.detach().clone() for n, p in one_run.named_parameters()}
    first, saved = closed_edits(tok, unedited_stats, REQUESTS[:2])
    paths = [p.save(tmp_path / f"edit{i}.safetensors") for i, p in enumerate(saved)]
    resumed = tiny_model("llama", intermediate=256)
    for path in paths:
        EditPatch.load(path).apply(resumed)
    assert [e.fit.targets[0].shape for e in ledger_of(resumed).entries] == [
        e.fit.targets[0].shape for e in ledger_of(first).entries
    ]
    closed_edits(tok, unedited_stats, REQUESTS[2:], model=resumed)
    assert all(torch.equal(a, b) for a, b in zip(one_run.parameters(), resumed.parameters(), strict=True))
    patches[2].revert(one_run)
    assert len(ledger_of(one_run)) == 2
    assert not all(torch.equal(p, after_two[n]) for n, p in one_run.named_parameters())  # it was after 3
    # revert restores the weights after two edits, and the next edit re-solves those two again
    closed_edits(tok, unedited_stats, REQUESTS[2:], model=one_run)
    assert all(torch.equal(a, b) for a, b in zip(one_run.parameters(), resumed.parameters(), strict=True))


def test_a_closed_form_write_wants_the_unedited_statistics(tok, unedited_stats):
    from anyedit_lightning.stats.covariance import StatsMismatchError, compute_covariance

    model, _ = closed_edits(tok, unedited_stats, REQUESTS[:1])
    # the unedited model's statistics pass the fingerprint check on the edited model (its ledger says so)
    edit(model, tok, REQUESTS[1], method="memit", stats=unedited_stats, writer_kwargs=CLOSED_WRITER, **CLOSED)
    edited = compute_covariance(model, tok, [LAYER], corpus=TEXTS * 6, max_tokens=3000, use_cache=False)
    with pytest.raises(StatsMismatchError, match="fingerprint"):
        edit(model, tok, REQUESTS[2], method="memit", stats=edited, writer_kwargs=CLOSED_WRITER, **CLOSED)


def test_a_closed_form_write_over_another_methods_edit_warns(tok, unedited_stats, caplog):
    model = tiny_model("llama", intermediate=256)
    edit(model, tok, REQUESTS[0], method="unke", writer_kwargs=writer(steps=3), **EDIT)
    with caplog.at_level(logging.WARNING, logger="anyedit_lightning.writers.memit"):
        edit(
            model,
            tok,
            REQUESTS[1],
            method="memit",
            stats=unedited_stats,
            writer_kwargs=CLOSED_WRITER,
            **CLOSED,
        )
    assert "cannot solve them again" in caplog.text


def test_unke_takes_more_steps_for_a_batch_write(tok, monkeypatch):
    from anyedit_lightning.writers.unke import UnkeWrite

    steps, real = [], UnkeWrite._fit
    monkeypatch.setattr(
        UnkeWrite, "_fit", lambda self, t, terms, n: steps.append(n) or real(self, t, terms, n)
    )
    for requests in (REQUESTS[:1], REQUESTS):
        edit(
            tiny_model("llama"),
            tok,
            requests,
            method="unke",
            writer_kwargs=writer(steps=2, steps_per_request=3),
            **EDIT,
        )
    assert steps == [2, 2 + 3 * 2]


def test_unke_refit_starts_from_the_unedited_layer_and_counts_kept_requests(tok, monkeypatch):
    from anyedit_lightning.writers.unke import UnkeWrite

    model, seen, real = tiny_model("llama"), [], UnkeWrite._fit
    unedited = {n: p.detach().clone() for n, p in model.named_parameters()}

    def spy(self, tuned, terms, steps):
        seen.append((steps, all(torch.equal(p, unedited[f"model.layers.{LAYER}.{n}"]) for n, p in tuned)))
        return real(self, tuned, terms, steps)

    monkeypatch.setattr(UnkeWrite, "_fit", spy)
    options = writer(steps=2, steps_per_request=3, refit=True)
    edit_sequentially(model, tok, REQUESTS, method="unke", batch_size=2, writer_kwargs=options, **EDIT)
    assert seen == [(2 + 3, True), (2 + 3 * 2, True)]  # the second write: 1 new + 2 kept requests
    assert not all(torch.equal(p, unedited[n]) for n, p in model.named_parameters())
