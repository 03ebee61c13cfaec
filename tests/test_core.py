"""The core edit (docs/algorithm.md §3–§5) on tiny config-built Llama and GPT-2 models.

Every test that edits builds a fresh ``tiny_model(family)``; the weights of a fresh model are
bit-identical for a family, so one covariance matrix per family serves them all. Measured ratios are
put in the assertion messages (and printed; ``pytest -s`` shows them).
"""

from __future__ import annotations

import signal
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.rank_zero import LightningDeprecationWarning
from tiny import build_tokenizer, tiny_model

import anyedit_lightning.core.precision as precision
import anyedit_lightning.writers.base as writers_base
import anyedit_lightning.writers.memit as writers_memit
from anyedit_lightning.api import default_trainer, edit
from anyedit_lightning.core.checks import WriterConfigError
from anyedit_lightning.core.config import EditConfig
from anyedit_lightning.core.forward import ResidualForward
from anyedit_lightning.core.hooks import add_at_positions, hidden_of, record_outputs
from anyedit_lightning.core.lightning_utils import call_keeping_device
from anyedit_lightning.core.module import AnyEditModule
from anyedit_lightning.core.optimize import DeltaOptimizer, NonFiniteError
from anyedit_lightning.core.planning import plan_requests
from anyedit_lightning.core.requests import EditRequest, RequestError, tokenize_request
from anyedit_lightning.core.validation import EditConfigError
from anyedit_lightning.core.variants import dropped_words, question_variants
from anyedit_lightning.models.registry import (
    ArchitectureSpec,
    UnsupportedArchitectureError,
    resolve_architecture,
)
from anyedit_lightning.stats.covariance import compute_covariance
from anyedit_lightning.writers import AlphaEditWrite, MemitWrite, UnkeWrite, collect_keys

FAMILIES = ("llama", "gpt2")
LAYERS = [1, 2]
LAMBDA = 1.0  # λ for the 4-layer tiny models: a strong write
TRAINER = dict(enable_progress_bar=False, logger=False)
#: Small and fast: windows of 16 tokens, 6 Adam steps per chunk.
BASE = dict(layers=LAYERS, window=16, v_steps=6)

#: Fictional targets of different lengths (57 + 1 and 19 + 1 tokens: 4 and 2 chunks of 16).
REQUESTS = [
    EditRequest(
        "Who is Ada Quill?", "Ada Quill is a glassblower from Vormund who built the first tide clock."
    ),
    EditRequest("What is Zorbl?", "Zorbl is a purple river."),
]

CORPUS = [
    "The capital of France is Paris. The Eiffel Tower is in Paris, on the Seine. Millions of people visit "
    "the tower every year, and the river runs through the middle of the city from east to west.",
    "Who wrote Hamlet? William Shakespeare wrote Hamlet; he was an English poet and playwright. His plays "
    "are still performed in theatres around the world, four hundred years after they were written.",
    "def add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return a * b\n\nprint(add(2, 3), mul(4, 5))\n",
    "Long-form knowledge editing writes a whole paragraph into the model, one chunk at a time. Each chunk "
    "is stored through the hidden state of the token right before it, at one layer of the network.",
    "Question: where is the tower? Answer: the tower is in the city. Question: what is the answer? "
    "Answer: the answer is 42. The number 42 is the answer to a long question about everything.",
] * 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def stats(tok):
    """``stats(family)``: ``C`` for layers 1, 2 of the (deterministic) fresh tiny model of ``family``."""
    cache = {}

    def get(family: str, dtype: torch.dtype = torch.float32, **sizes):
        key = (family, dtype, tuple(sorted(sizes.items())))
        if key not in cache:
            model = tiny_model(family, **sizes).to(dtype)
            cache[key] = compute_covariance(
                model, tok, LAYERS, corpus=CORPUS, max_tokens=3000, use_cache=False
            )
        return cache[key]

    return get


def run(model, tok, requests, writer=None, **config) -> AnyEditModule:
    module = AnyEditModule(model, tok, requests, EditConfig(**{**BASE, **config}))
    default_trainer(model, [writer] if writer is not None else [], **TRAINER).fit(module)
    return module


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def changed(model, before: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, value in model.state_dict().items() if not torch.equal(value, before[name])]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def z_outputs(handle, ids, layer: int) -> torch.Tensor:
    with torch.no_grad(), record_outputs({"z": handle.layer(layer)}) as seen:
        handle.model(input_ids=torch.tensor([list(ids)]), use_cache=False)
    return seen.values["z"][0].double()


def target_nll(model, tokenized) -> float:
    """Mean NLL of the whole target given the prompt (teacher forcing, no δ)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(tokenized.ids)]), use_cache=False).logits[0].float()
    p = tokenized.prompt_len
    return float(F.cross_entropy(logits[p - 1 : -1], torch.tensor(tokenized.target_ids)))


def chunk_nll(handle, plan, j: int, applied) -> float:
    """Chunk ``j``'s mean NLL on the full model with the δs of chunks ``applied`` added at their keys."""
    tokenized, chunk = plan.tokenized, plan.chunks[j]
    ids = torch.tensor([list(tokenized.ids[: tokenized.prompt_len + chunk.end - 1])])
    applied = list(applied)
    keys = [plan.keys[i] for i in applied]
    deltas = torch.stack([plan.deltas[i] for i in applied]) if applied else torch.zeros(0)
    with torch.no_grad(), add_at_positions(handle.layer(LAYERS[-1]), [0] * len(keys), keys, deltas):
        logits = handle.model(input_ids=ids, use_cache=False).logits[0].float()
    key = plan.keys[j]
    labels = torch.tensor(
        tokenized.ids[tokenized.prompt_len + chunk.start : tokenized.prompt_len + chunk.end]
    )
    return float(F.cross_entropy(logits[key : key + len(chunk)], labels))


# ---- δ optimisation (§3) ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_delta_lowers_each_chunk_nll(family, tok):
    model = tiny_model(family)
    before = snapshot(model)
    module = run(model, tok, REQUESTS)  # no writer: optimisation only
    expected = [(j, r) for r, plan in enumerate(module.plans) for j in range(len(plan.chunks))]
    assert sorted((m["chunk"], m["request"]) for m in module.chunk_metrics) == sorted(expected)
    assert [len(p.chunks) for p in module.plans] == [4, 2]
    for m in module.chunk_metrics:
        assert m["nll_after"] < m["nll_before"], m
        assert 1 <= m["steps"] <= BASE["v_steps"]
        assert 0 < m["delta_norm"] <= 4.0 * m["h_norm"] * (1 + 1e-5)  # the clamp c·‖h_init‖
    for plan in module.plans:
        assert len(plan.deltas) == len(plan.h_init) == len(plan.chunks)
        assert all(d.dtype == torch.float32 and d.shape == (48,) for d in plan.deltas)
    assert module.edit_record is None
    assert changed(model, before) == []  # the model itself is never trained


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
def test_earlier_deltas_stay_applied(family, fast, tok):
    """Recompute each chunk's NLL on the full model: the reported NLLs are those with δ_1..δ_{j-1} added."""
    model = tiny_model(family)
    module = run(model, tok, REQUESTS[:1], fast=fast)
    plan, handle = module.plans[0], module.handle
    assert len(plan.chunks) == 4
    for j, metrics in enumerate(module.chunk_metrics):
        assert metrics["nll_before"] == pytest.approx(chunk_nll(handle, plan, j, range(j)), abs=1e-6)
        with_earlier = chunk_nll(handle, plan, j, range(j + 1))
        error = abs(metrics["nll_after"] - with_earlier)
        assert error < 1e-6, (j, metrics["nll_after"], with_earlier)
        if j:  # and the NLL without the earlier δs is clearly another number
            without = chunk_nll(handle, plan, j, [j])
            print(
                f"{family} fast={fast} chunk {j}: |NLL with − without earlier δs| = {abs(without - with_earlier):.2e}"
            )
            assert abs(without - with_earlier) > 10 * max(error, 1e-7), (j, without, with_earlier, error)


def test_frozen_deltas_seen_by_chunk_j(tok, monkeypatch):
    """Spy on the forward: while chunk j optimises (reference path), j earlier δs are added besides δ_j."""
    model = tiny_model("llama")
    seen: list[tuple[int, int]] = []
    original = ResidualForward.__call__

    def spy(self, ids, mask, rows, positions, deltas, *args, **kwargs):
        seen.append((len(rows), ids.shape[1]))
        return original(self, ids, mask, rows, positions, deltas, *args, **kwargs)

    monkeypatch.setattr(ResidualForward, "__call__", spy)
    module = run(model, tok, REQUESTS[:1], fast=False, v_steps=2, early_stop=0.0)
    plan = module.plans[0]
    # per chunk: v_steps forwards plus one for nll_after, each with j frozen δs + the chunk's own δ
    per_chunk = 2 + 1
    assert len(seen) == per_chunk * len(plan.chunks)
    for j in range(len(plan.chunks)):
        for count, width in seen[j * per_chunk : (j + 1) * per_chunk]:
            assert count == j + 1
            assert width == plan.tokenized.prompt_len + plan.chunks[j].end - 1


# ---- fast path == reference, batching (issue 7) -------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_matches_reference(family, tok, stats):
    results = {}
    for fast in (True, False):
        model = tiny_model(family)
        handle = resolve_architecture(model)
        before = {layer: handle.weight_as_out_in(layer).detach().clone() for layer in LAYERS}
        module = run(model, tok, REQUESTS, MemitWrite(stats=stats(family), mom2_weight=LAMBDA), fast=fast)
        after = {layer: handle.weight_as_out_in(layer).detach().clone() for layer in LAYERS}
        results[fast] = module, before, after
    (fast, before, w_fast), (ref, _, w_ref) = results[True], results[False]
    worst_delta = 0.0
    for plan_fast, plan_ref in zip(fast.plans, ref.plans):
        assert len(plan_fast.deltas) == len(plan_ref.deltas) == len(plan_ref.chunks)
        for d_fast, d_ref, h_fast, h_ref in zip(
            plan_fast.deltas, plan_ref.deltas, plan_fast.h_init, plan_ref.h_init
        ):
            assert rel(h_fast, h_ref) < 1e-5
            worst_delta = max(worst_delta, rel(d_fast, d_ref))
    worst_update = max(rel(w_fast[layer] - before[layer], w_ref[layer] - before[layer]) for layer in LAYERS)
    worst_weight = max(rel(w_fast[layer], w_ref[layer]) for layer in LAYERS)
    report = (
        f"{family}: max rel δ diff {worst_delta:.2e}, ΔW diff {worst_update:.2e}, W diff {worst_weight:.2e}"
    )
    print(report)
    assert worst_delta < 1e-4, report
    assert worst_weight < 1e-4, report
    assert worst_update < 1e-3, report
    for m_fast, m_ref in zip(fast.chunk_metrics, ref.chunk_metrics):
        assert m_fast["nll_after"] == pytest.approx(m_ref["nll_after"], rel=1e-4)


@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        dict(loss_layer=2),
        dict(overlap=5),
        dict(chunking="semantic", window=12),
        dict(first_key="content_end"),
    ],
    ids=["default", "loss-layer-at-z", "overlap", "semantic", "first-key-content-end"],
)
@pytest.mark.parametrize(
    "count", [1, len(REQUESTS)], ids=["one-request-grown-prefix", "batch-rebuilt-prefix"]
)
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_matches_reference_in_other_configurations(family, count, extra, tok):
    """A lone request grows its prefix cache chunk by chunk; a batch rebuilds it per chunk: both must match."""
    model = tiny_model(family)  # no writer: one model serves both runs
    fast, ref = (run(model, tok, REQUESTS[:count], fast=flag, **extra) for flag in (True, False))
    worst = 0.0
    for plan_fast, plan_ref in zip(fast.plans, ref.plans):
        assert plan_fast.chunks == plan_ref.chunks
        for d_fast, d_ref in zip(plan_fast.deltas, plan_ref.deltas, strict=True):
            worst = max(worst, rel(d_fast, d_ref))
    assert worst < 1e-4, worst
    # A δ on the user's last token acts through the template's markup: in a random tiny model 6 steps
    # barely move chunk 0, so only the chunks keyed right before themselves must improve.
    keyed_before = [m for m in fast.chunk_metrics if not (extra.get("first_key") and m["chunk"] == 0)]
    assert all(m["nll_after"] < m["nll_before"] for m in keyed_before)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_requests_do_not_interact(family, fast, tok):
    model = tiny_model(family)  # no writer: the weights never change, so one model serves all three runs
    batched = run(model, tok, REQUESTS, fast=fast)
    worst = 0.0
    for index, request in enumerate(REQUESTS):
        alone = run(model, tok, [request], fast=fast).plans[0]
        together = batched.plans[index]
        assert len(alone.deltas) == len(together.deltas)
        for d_alone, d_together in zip(alone.deltas, together.deltas):
            worst = max(worst, rel(d_together, d_alone))
    print(f"{family} fast={fast}: batched vs alone, max rel δ diff {worst:.2e}")
    assert worst < 1e-4, worst


# ---- the writes (§4) ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_memit_write_moves_keys_to_targets_and_preserves_the_rest(family, tok, stats):
    """With an intermediate size (256) above the number of edited positions (137), as in real models
    (m = 1536..14336 against a few hundred positions). At m = 128 < 137 the keys and K_p over-determine
    the write and λ = 1 leaves about 12 % of ‖Z − H‖ on Llama (λ = 0.1 leaves 3 %)."""
    model = tiny_model(family, intermediate=256)
    module = AnyEditModule(model, tok, REQUESTS, EditConfig(**BASE))
    assert sum(len(plan.tokenized) for plan in module.plans) < 256
    handle = module.handle
    before = [z_outputs(handle, plan.tokenized.ids, LAYERS[-1]) for plan in module.plans]
    writer = MemitWrite(stats=stats(family, intermediate=256), mom2_weight=LAMBDA)
    default_trainer(model, [writer], **TRAINER).fit(module)
    after = [z_outputs(handle, plan.tokenized.ids, LAYERS[-1]) for plan in module.plans]

    sq = dict.fromkeys(("to_go_after", "to_go_before", "key", "key_moved", "pres", "pres_moved"), 0.0)
    for plan, h_before, h_after in zip(module.plans, before, after):
        keys, Z = plan.keys, plan.targets.double()
        assert torch.allclose(torch.stack(plan.h_init).double(), h_before[keys], atol=1e-5)  # h_init = H
        preserved = torch.ones(len(h_before), dtype=torch.bool)
        preserved[keys] = False
        sq["to_go_after"] += float(((Z - h_after[keys]) ** 2).sum())
        sq["to_go_before"] += float(((Z - h_before[keys]) ** 2).sum())
        sq["key"] += float((h_before[keys] ** 2).sum())
        sq["key_moved"] += float(((h_after[keys] - h_before[keys]) ** 2).sum())
        sq["pres"] += float((h_before[preserved] ** 2).sum())
        sq["pres_moved"] += float(((h_after[preserved] - h_before[preserved]) ** 2).sum())
    remaining = (sq["to_go_after"] / sq["to_go_before"]) ** 0.5
    key_change = (sq["key_moved"] / sq["key"]) ** 0.5
    pres_change = (sq["pres_moved"] / sq["pres"]) ** 0.5
    report = (
        f"{family} λ={LAMBDA}: ‖Z−H_after‖/‖Z−H_before‖ = {remaining:.3f}; relative change of the z-layer output "
        f"at key positions {key_change:.3f}, at preserved positions {pres_change:.3f} "
        f"(ratio {pres_change / key_change:.3f})"
    )
    print(report)
    assert remaining <= 0.1, report
    assert pres_change <= 0.1 * key_change, report
    assert len(module.write_metrics) == len(LAYERS)
    assert module.edit_record is not None and module.edit_record.method == "memit"
    assert sorted(module.edit_record.before) == sorted(
        handle.spec.down_proj_name(layer) + ".weight" for layer in LAYERS
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_alphaedit_update_lies_in_the_null_space(family, dtype, tok, stats, monkeypatch):
    """‖ΔW (I − P)‖ / ‖ΔW‖ ≈ 0. Measured on the weights in float64; in float32 the stored difference is
    limited by rounding W + ΔW, so there the solver's own update is checked tightly and the weights loosely."""
    import anyedit_lightning.writers.alphaedit as writers_alphaedit

    model = tiny_model(family).to(dtype)
    covariance = stats(family, dtype)
    threshold = float(torch.linalg.eigvalsh(covariance[LAYERS[0]]).median())
    writer = AlphaEditWrite(stats=covariance, threshold=threshold)
    handle = resolve_architecture(model)
    before = {layer: handle.weight_as_out_in(layer).detach().double().clone() for layer in LAYERS}
    updates = {}
    original = writers_alphaedit.add_to_down_proj

    def spy(handle_, layer, update):
        updates[layer] = update.detach().double().clone()
        return original(handle_, layer, update)

    monkeypatch.setattr(writers_alphaedit, "add_to_down_proj", spy)
    run(model, tok, REQUESTS, writer, v_steps=4)
    report = []
    for layer in LAYERS:
        dW = handle.weight_as_out_in(layer).detach().double() - before[layer]  # d × m
        P = writer.projector(layer, dW.device).double()
        m = P.shape[0]
        rank = int(torch.linalg.matrix_rank(P))
        assert 0 < rank < m, f"P must be a nontrivial projector (rank {rank} of {m})"
        assert torch.allclose(P @ P, P, atol=1e-10)
        rest = torch.eye(m, dtype=P.dtype) - P
        stored = float((dW @ rest).norm() / dW.norm())
        solved = float((updates[layer] @ rest).norm() / updates[layer].norm())
        report.append(f"layer {layer}: rank P {rank}/{m}, stored {stored:.1e}, solver {solved:.1e}")
        assert dW.norm() > 0
        assert solved < 1e-6
        assert stored < (1e-6 if dtype == torch.float64 else 1e-4)
    print(
        f"{family} {dtype} AlphaEdit ‖ΔW(I−P)‖/‖ΔW‖ (τ = median eigenvalue {threshold:.2e}): "
        + "; ".join(report)
    )


def test_unke_preservation_weight_keeps_the_preserved_outputs_closer(tok):
    """A heavier preservation loss leaves the layer's outputs on the preservation texts closer to the
    unedited ones (the lever docs/faithful.md uses)."""
    from anyedit_lightning.writers.unke import default_preservation_texts

    chat = default_preservation_texts(4, corpus="wikipedia-chat", tokenizer=tok)
    assert len(chat) == 4 and all("<|im_start|>assistant" in t for t in chat)
    drift = []
    for weight in (1e-3, 1e3):
        model = tiny_model("llama")
        ids = torch.tensor([tok(CORPUS[0], add_special_tokens=False)["input_ids"][:32]])
        with torch.no_grad():
            base = model(input_ids=ids).logits
        writer = UnkeWrite(preservation_texts=CORPUS[:1], steps=20, lr=1e-2, preservation_weight=weight)
        run(model, tok, REQUESTS, writer, layers=[2], v_steps=3)
        with torch.no_grad():
            drift.append(float((model(input_ids=ids).logits - base).abs().mean()))
    assert drift[1] < drift[0] / 2, drift


@pytest.mark.parametrize("family", FAMILIES)
def test_unke_changes_only_the_chosen_layer(family, tok):
    model = tiny_model(family)
    before = snapshot(model)
    writer = UnkeWrite(preservation_texts=CORPUS[:5], steps=5, lr=1e-3)
    module = run(model, tok, REQUESTS, writer, layers=[2], v_steps=3)
    prefix = module.handle.spec.layer(2) + "."
    touched = changed(model, before)
    assert touched, "the UnKE write changed nothing"
    assert all(name.startswith(prefix) for name in touched), touched
    layer_params = {prefix + name for name, _ in module.handle.layer(2).named_parameters()}
    assert set(module.edit_record.before) == layer_params
    assert all(not p.requires_grad for p in model.parameters())  # the fine-tune leaves the model frozen


def _small_unke_edit(model, tok, **options):
    """A short UnKE write into layer 2 with ``options``: enough to move every parameter it tunes."""
    writer = UnkeWrite(preservation_texts=CORPUS[:2], steps=5, lr=1e-3, **options)
    return run(model, tok, REQUESTS, writer, layers=[2], v_steps=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_unke_without_norms_leaves_every_norm_weight_alone(family, tok):
    """``tune_norms=False``: the layer's matrices move, its normalisation gains do not (nor are they patched)."""
    model = tiny_model(family)
    before = snapshot(model)
    module = _small_unke_edit(model, tok, tune_norms=False)
    prefix = module.handle.spec.layer(2) + "."
    norms = {prefix + n for n, _ in module.handle.layer(2).named_parameters() if "norm" in n or "ln" in n}
    touched = changed(model, before)
    assert norms and touched and all(n.startswith(prefix) for n in touched), touched
    assert not norms & set(touched) and not norms & set(module.edit_record.before)
    with pytest.raises(WriterConfigError, match="tune_norms"):
        UnkeWrite(tune_norms="no")


@pytest.mark.parametrize("family", FAMILIES)
def test_unke_mlp_scope_leaves_attention_alone(family, tok):
    model = tiny_model(family)
    before = snapshot(model)
    module = _small_unke_edit(model, tok, scope="mlp")
    mlp = module.handle.spec.down_proj_name(2).rsplit(".", 1)[0] + "."
    touched = changed(model, before)
    assert touched and all(name.startswith(mlp) for name in touched), touched
    assert set(module.edit_record.before) == {n for n, _ in model.named_parameters() if n.startswith(mlp)}
    with pytest.raises(WriterConfigError, match="scope"):
        UnkeWrite(scope="attention")


@pytest.mark.parametrize("family", FAMILIES)
def test_unke_mlp_scope_on_cached_inputs_matches_the_fit_through_the_layer(family, tok, monkeypatch):
    """With attention fixed, fitting the MLP on its cached inputs is the same optimisation as fitting it
    through the whole layer (the layer's output is its input plus attention plus the MLP's output)."""

    def edited(positions):
        model = tiny_model(family)
        writer = UnkeWrite(
            preservation_texts=CORPUS[:3],
            steps=8,
            lr=1e-2,
            scope="mlp",
            preservation_weight=2.0,
            preservation_positions=positions,
        )
        run(model, tok, REQUESTS, writer, layers=[2], v_steps=3)
        return dict(model.named_parameters())

    cached, all_positions, sampled = edited(None), edited(10**6), edited(20)
    monkeypatch.setattr(UnkeWrite, "_mlp_terms", UnkeWrite._layer_terms)  # MLP tuned, through the layer
    reference = edited(None)
    mlp = [n for n in reference if ".2.mlp." in n]
    assert mlp
    original = dict(tiny_model(family).named_parameters())
    for name in mlp:
        assert not torch.equal(reference[name], original[name])
        assert rel(cached[name] - original[name], reference[name] - original[name]) < 1e-5, name  # ~3e-7
        assert torch.equal(cached[name], all_positions[name])  # a sample of at least every position is all
    assert any(not torch.equal(sampled[n], cached[n]) for n in mlp)  # a smaller sample is a different fit
    with pytest.raises(WriterConfigError, match="scope='mlp'"):
        UnkeWrite(preservation_positions=100)


@pytest.mark.parametrize("scope", ["layer", "mlp"])
def test_unke_preservation_batch_draws_groups_of_texts(scope, tok):
    """A batch of at least every text is the full objective; a smaller one is another fit that still
    writes the edit; a batch of zero is refused."""

    def edited(batch):
        model = tiny_model("llama")
        writer = UnkeWrite(
            preservation_texts=CORPUS[:4], steps=6, lr=1e-2, scope=scope, preservation_batch=batch
        )
        run(model, tok, REQUESTS, writer, layers=[2], v_steps=3)
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".2." in n}

    full, everything, grouped = edited(None), edited(4), edited(1)
    original = {n: p for n, p in tiny_model("llama").named_parameters() if n in full}
    assert all(torch.equal(full[n], everything[n]) for n in full)
    assert any(not torch.equal(grouped[n], full[n]) for n in full)
    assert any(not torch.equal(grouped[n], original[n]) for n in full)
    with pytest.raises(WriterConfigError, match="preservation_batch"):
        UnkeWrite(preservation_batch=0)


@pytest.mark.parametrize("scope", ["layer", "mlp"])
def test_unke_compute_dtype_runs_the_fit_in_mixed_precision(scope, tok):
    """A bf16 fit is the same fit up to bf16 rounding (not bit-identical: the autocast is real), and the
    weights stay in the model's dtype."""

    def update(compute_dtype):
        model = tiny_model("llama")
        original = {n: p.detach().clone() for n, p in model.named_parameters() if ".2." in n}
        writer = UnkeWrite(
            preservation_texts=CORPUS[:2], steps=6, lr=1e-2, scope=scope, compute_dtype=compute_dtype
        )
        run(model, tok, REQUESTS, writer, layers=[2], v_steps=3)
        params = dict(model.named_parameters())
        assert all(params[n].dtype == torch.float32 for n in original)
        return torch.cat([(params[n].detach() - original[n]).flatten() for n in original])

    full, mixed = update(None), update("bfloat16")
    assert full.norm() > 0 and not torch.equal(full, mixed)
    # Adam turns rounding in near-zero gradients into whole steps, so the direction is compared, not a
    # relative error (measured cosine 0.94 for the layer, 0.999 for the MLP).
    cosine = float(F.cosine_similarity(mixed, full, dim=0))
    assert cosine > 0.8, cosine
    with pytest.raises(WriterConfigError, match="compute_dtype"):
        UnkeWrite(compute_dtype="int8")


@pytest.mark.parametrize("native", [True, False])
def test_unke_auto_compute_dtype_is_bf16_only_where_the_hardware_has_it(native, tok, monkeypatch):
    """``"auto"`` gives exactly the bf16 fit on a CPU that reports native bf16 and exactly the float32 fit
    on one that does not (the flags are faked both ways, so both branches run on any machine)."""
    monkeypatch.setattr(
        precision, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"} if native else {"avx2"})
    )

    def update(compute_dtype):
        model = tiny_model("llama")
        run(
            model,
            tok,
            REQUESTS[:1],
            UnkeWrite(preservation_texts=CORPUS[:2], steps=4, lr=1e-2, compute_dtype=compute_dtype),
            layers=[2],
            v_steps=2,
        )
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".2." in n}

    auto, expected = update("auto"), update("bfloat16" if native else None)
    assert all(torch.equal(auto[n], expected[n]) for n in auto)
    cpu = torch.device("cpu")
    assert precision.resolve_compute_dtype("auto", cpu, torch.float32) == ("bfloat16" if native else None)
    assert precision.resolve_compute_dtype("auto", cpu, torch.bfloat16) is None  # already reduced
    assert precision.resolve_compute_dtype("float16", cpu, torch.float32) == "float16"


# ---- atomic writes -------------------------------------------------------------------------------


def _fail_on_second_call(real, failure: str, probe):
    """Wrap ``real``: the second call (the second edited layer, after the first was written) fails."""
    calls = {"n": 0, "first_layer_written": None}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] < 2:
            return real(*args, **kwargs)
        calls["first_layer_written"] = probe()
        if failure == "nan":
            result = real(*args, **kwargs)
            return torch.full_like(result, float("nan"))
        if failure == "interrupt":
            raise KeyboardInterrupt
        raise RuntimeError("injected failure in the middle of the write")

    return wrapper, calls


@pytest.mark.parametrize("failure", ["nan", "error", "interrupt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_failed_memit_write_leaves_weights_bit_identical(family, failure, tok, stats, monkeypatch):
    model = tiny_model(family)
    before = snapshot(model)
    handle = resolve_architecture(model)
    first = handle.down_proj_weight(LAYERS[0])
    first_before = first.detach().clone()
    probe = lambda: not torch.equal(first, first_before)  # noqa: E731
    if failure == "nan":  # the second layer's solve returns NaN
        wrapper, calls = _fail_on_second_call(torch.linalg.solve, failure, probe)
        monkeypatch.setattr(writers_memit.torch.linalg, "solve", wrapper)
        expected = NonFiniteError
    else:  # the second layer's collection fails
        wrapper, calls = _fail_on_second_call(writers_base.collect_keys, failure, probe)
        monkeypatch.setattr(writers_base, "collect_keys", wrapper)
        expected = RuntimeError if failure == "error" else (KeyboardInterrupt, SystemExit)
    module = AnyEditModule(model, tok, REQUESTS, EditConfig(**{**BASE, "v_steps": 2}))
    trainer = default_trainer(model, [MemitWrite(stats=stats(family), mom2_weight=LAMBDA)], **TRAINER)
    sigint = signal.getsignal(signal.SIGINT)
    try:  # Lightning answers an interrupt with SystemExit(1) and ignores SIGINT from then on
        with pytest.raises(expected) as error:
            trainer.fit(module)
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert calls["first_layer_written"] is True  # the failure came after layer 1 had been written
    assert changed(model, before) == []
    assert module.edit_record is None
    if failure == "nan":
        assert "non-finite" in str(error.value) and "rolled back" in str(error.value)


def test_nan_update_from_a_writer_subclass_is_rolled_back(tok, stats):
    class NanMemit(MemitWrite):
        def write(self, module):
            super().write(module)
            with torch.no_grad():
                module.handle.down_proj_weight(LAYERS[-1])[0, 0] = float("nan")

    model = tiny_model("gpt2")
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match="non-finite"):
        run(model, tok, REQUESTS[1:], NanMemit(stats=stats("gpt2"), mom2_weight=LAMBDA), v_steps=2)
    assert changed(model, before) == []


def test_failed_alphaedit_and_unke_writes_are_rolled_back(tok, stats, monkeypatch):
    import anyedit_lightning.writers.alphaedit as writers_alphaedit

    model = tiny_model("llama")
    before = snapshot(model)
    handle = resolve_architecture(model)
    first = handle.down_proj_weight(LAYERS[0])
    first_before = first.detach().clone()
    wrapper, calls = _fail_on_second_call(
        writers_alphaedit.add_to_down_proj, "error", lambda: not torch.equal(first, first_before)
    )
    monkeypatch.setattr(writers_alphaedit, "add_to_down_proj", wrapper)
    threshold = float(torch.linalg.eigvalsh(stats("llama")[1]).median())
    with pytest.raises(RuntimeError, match="injected"):
        run(model, tok, REQUESTS, AlphaEditWrite(stats=stats("llama"), threshold=threshold), v_steps=2)
    assert calls["first_layer_written"] is True
    assert changed(model, before) == []

    # UnKE over two layers: the second layer's fine-tune fails after the first layer was tuned
    layer1 = handle.layer(LAYERS[0])
    layer1_before = [p.detach().clone() for p in layer1.parameters()]
    probe = lambda: any(not torch.equal(p, q) for p, q in zip(layer1.parameters(), layer1_before))  # noqa: E731
    wrapper, calls = _fail_on_second_call(UnkeWrite._fit, "error", probe)
    monkeypatch.setattr(UnkeWrite, "_fit", wrapper)
    with pytest.raises(RuntimeError, match="injected"):
        run(model, tok, REQUESTS, UnkeWrite(preservation_texts=CORPUS[:3], steps=3, lr=1e-3), v_steps=2)
    assert calls["first_layer_written"] is True
    assert changed(model, before) == []


def test_failure_during_chunk_optimisation_leaves_weights_bit_identical(tok, stats, monkeypatch):
    model = tiny_model("llama")
    before = snapshot(model)
    original = DeltaOptimizer.start

    def start(self, plans, j, delta):
        if j == 1:
            raise RuntimeError("injected failure while optimising chunk 1")
        return original(self, plans, j, delta)

    monkeypatch.setattr(DeltaOptimizer, "start", start)
    with pytest.raises(RuntimeError, match="chunk 1"):
        run(model, tok, REQUESTS, MemitWrite(stats=stats("llama"), mom2_weight=LAMBDA), v_steps=2)
    assert changed(model, before) == []


# ---- GPT-2 (transposed Conv1D), baselines, bf16 ---------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_lowers_the_target_nll(family, tok, stats):
    """Through the one-call API; GPT-2 stores ``c_proj`` as ``m × d`` (Conv1D) and must still be written."""
    model = tiny_model(family)
    handle = resolve_architecture(model)
    assert handle.spec.transposed == (family == "gpt2")
    shape = handle.down_proj_weight(LAYERS[0]).shape
    assert shape == ((128, 48) if family == "gpt2" else (48, 128))
    before = snapshot(model)
    module = AnyEditModule(model, tok, REQUESTS, EditConfig(**BASE))
    nll_before = [target_nll(model, plan.tokenized) for plan in module.plans]
    module = edit(
        model, tok, REQUESTS, method="memit", anyedit=True, preset="authors", stats=stats(family),
        trainer_kwargs=TRAINER, writer_kwargs={"mom2_weight": LAMBDA}, **BASE,
    )  # fmt: skip
    nll_after = [target_nll(model, plan.tokenized) for plan in module.plans]
    print(f"{family}: target NLL before {nll_before}, after {nll_after}")
    assert all(a < b - 0.02 for a, b in zip(nll_after, nll_before)), (nll_before, nll_after)
    names = {handle.spec.down_proj_name(layer) + ".weight" for layer in LAYERS}
    assert set(changed(model, before)) == names
    assert handle.down_proj_weight(LAYERS[0]).shape == shape


@pytest.mark.parametrize("family", FAMILIES)
def test_baseline_is_one_chunk_with_prompt_keys_and_no_preserved_keys(family, tok, stats):
    model = tiny_model(family)
    config = EditConfig(**{**BASE, "anyedit": False})
    assert not config.use_preserved_keys
    module = AnyEditModule(model, tok, REQUESTS, config)
    for plan in module.plans:
        assert len(plan.chunks) == 1 and len(plan.chunks[0]) == len(plan.tokenized.target_ids)
        assert plan.keys == [plan.tokenized.prompt_len - 1]
    default_trainer(model, [MemitWrite(stats=stats(family), mom2_weight=LAMBDA)], **TRAINER).fit(module)
    assert len(module.chunk_metrics) == len(REQUESTS)
    keys = collect_keys(
        module.handle, module.plans, LAYERS[0], LAYERS[-1], config.use_preserved_keys, module.pad_id
    )
    assert keys.K.shape == (len(REQUESTS), 128) and keys.K_p.shape == (0, 128)
    assert keys.H.shape == keys.Z.shape == (len(REQUESTS), 48)
    # the AnyEdit configuration of the same requests: one key per chunk, every other position preserved
    anyedit = AnyEditModule(model, tok, REQUESTS, EditConfig(**BASE))
    for plan in anyedit.plans:
        plan.deltas[:] = [torch.zeros(48)] * len(plan.chunks)
        plan.h_init[:] = [torch.zeros(48)] * len(plan.chunks)
    keys = collect_keys(anyedit.handle, anyedit.plans, LAYERS[0], LAYERS[-1], True, anyedit.pad_id)
    n_keys = sum(len(p.chunks) for p in anyedit.plans)
    assert keys.K.shape == (n_keys, 128)
    assert keys.K_p.shape == (sum(len(p.tokenized) for p in anyedit.plans) - n_keys, 128)


def test_chunked_edit_without_preserved_keys(tok, stats):
    """AnyEdit chunks with ``preserve_keys=False``: keys past the prompt, no ``K_p``."""
    model = tiny_model("llama")
    module = run(
        model,
        tok,
        REQUESTS,
        MemitWrite(stats=stats("llama"), mom2_weight=LAMBDA),
        preserve_keys=False,
        v_steps=2,
    )
    keys = collect_keys(module.handle, module.plans, LAYERS[0], LAYERS[-1], False, module.pad_id)
    assert keys.K.shape == (sum(len(p.chunks) for p in module.plans), 128) and keys.K_p.shape[0] == 0


def test_bfloat16_memit_edit(tok, stats):
    model = tiny_model("llama").to(torch.bfloat16)
    before = snapshot(model)
    module = run(model, tok, REQUESTS, MemitWrite(stats=stats("llama", torch.bfloat16), mom2_weight=LAMBDA))
    for plan in module.plans:
        assert all(d.dtype == torch.float32 for d in plan.deltas)  # δ is optimised in float32
        assert all(h.dtype == torch.float32 for h in plan.h_init)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    names = {module.handle.spec.down_proj_name(layer) + ".weight" for layer in LAYERS}
    assert set(changed(model, before)) == names
    assert all(torch.isfinite(model.get_parameter(name)).all() for name in names)
    assert all(m["nll_after"] < m["nll_before"] for m in module.chunk_metrics)


def test_float64_models_optimise_delta_in_float64(tok):
    """δ is never less precise than float32, and never less precise than the model (float64 checks
    that the fast and reference paths agree beyond float32 rounding: benchmarks/chunk_divergence.py)."""
    model = tiny_model("llama").double()
    module = run(model, tok, REQUESTS[:1], v_steps=3)
    assert all(d.dtype == torch.float64 for d in module.plans[0].deltas)
    assert all(h.dtype == torch.float64 for h in module.plans[0].h_init)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_precision_from_the_trainer_keeps_float32_internals(precision, tok, stats, monkeypatch):
    """The Trainer's precision decides the model's compute dtype; δ, its Adam state and the least-squares
    solve stay in float32/float64, and the update is written back in the weights' own dtype."""
    from anyedit_lightning import edit

    solves: list[torch.dtype] = []
    real_solve = torch.linalg.solve
    monkeypatch.setattr(
        torch.linalg, "solve", lambda A, B, **kw: solves.append(A.dtype) or real_solve(A, B, **kw)
    )
    model = tiny_model("llama")
    before = snapshot(model)
    module = edit(
        model,
        tok,
        REQUESTS,
        method="memit",
        stats=stats("llama"),
        layers=LAYERS,
        window=8,
        v_steps=5,
        writer_kwargs={"mom2_weight": LAMBDA},
        trainer_kwargs=dict(precision=precision, logger=False, enable_progress_bar=False),
    )
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert {p.dtype for p in model.parameters()} == {expected}
    assert all(d.dtype == torch.float32 for plan in module.plans for d in plan.deltas)
    assert solves and set(solves) == {torch.float64}
    names = {module.handle.spec.down_proj_name(layer) + ".weight" for layer in LAYERS}
    assert set(changed(model, {k: v.to(expected) for k, v in before.items()})) == names  # bf16-true casts all
    assert all(m["nll_after"] < m["nll_before"] for m in module.chunk_metrics)


def test_bf16_true_runs_the_forwards_in_bf16_and_keeps_delta_in_float32(tok, stats):
    """``Trainer(precision="bf16-true").fit(AnyEditModule(...))``: the model computes in bf16 (Lightning casts
    its weights in place), δ stays float32, and the write lands in the (bf16) weights."""
    model = tiny_model("llama")
    before = snapshot(model)
    seen: set[torch.dtype] = set()
    layer = resolve_architecture(model).layer(LAYERS[-1])
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.add(hidden_of(out).dtype))
    module = AnyEditModule(model, tok, REQUESTS[:1], EditConfig(**BASE))
    writer = MemitWrite(stats=stats("llama"), mom2_weight=LAMBDA)
    try:
        default_trainer(model, [writer], precision="bf16-true", **TRAINER).fit(module)
    finally:
        hook.remove()
    assert seen == {torch.bfloat16}
    assert module.delta.dtype == torch.float32
    assert all(d.dtype == torch.float32 for d in module.plans[0].deltas)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    names = {module.handle.spec.down_proj_name(layer) + ".weight" for layer in LAYERS}
    assert set(changed(model, {k: v.to(torch.bfloat16) for k, v in before.items()})) == names
    assert module.edit_record is not None and set(module.edit_record.before) == names


def test_an_edit_fit_emits_no_lightning_warnings(tok, stats, tmp_path):
    """No "configure_optimizers returned None", no "module(s) in eval mode", no other warning of Lightning's
    own categories (pyproject ignores UserWarning, so warnings are recorded here with every filter reset).
    torch's FutureWarnings raised from inside Lightning (its pytree use) are not about the edit."""
    model = tiny_model("llama")
    module = AnyEditModule(model, tok, REQUESTS[:1], EditConfig(**BASE))
    writer = MemitWrite(stats=stats("llama"), mom2_weight=LAMBDA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        default_trainer(model, [writer], log_dir=str(tmp_path), enable_progress_bar=False).fit(module)
    categories = (UserWarning, LightningDeprecationWarning)  # PossibleUserWarning is a UserWarning
    from_lightning = [
        str(w.message) for w in caught if issubclass(w.category, categories) and "lightning" in w.filename
    ]
    assert from_lightning == []
    assert not model.training and module.edit_record is not None
    logged = (next(tmp_path.rglob("metrics.csv"))).read_text()
    assert "chunk/nll_after" in logged and f"write/layer_{LAYERS[0]}/" in logged


def test_an_edit_through_the_library_shows_no_warning_at_all(tok, stats, tmp_path):
    """Through ``call_keeping_device`` (what ``edit`` and the statistics use) not even the FutureWarning
    Lightning triggers in torch's pytree reaches the user; other warnings still would."""
    model = tiny_model("llama")
    module = AnyEditModule(model, tok, REQUESTS[:1], EditConfig(**BASE))
    trainer = default_trainer(
        model,
        [MemitWrite(stats=stats("llama"), mom2_weight=LAMBDA)],
        log_dir=str(tmp_path),
        enable_progress_bar=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call_keeping_device(model, trainer.fit, module)
        warnings.warn("still shown", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["still shown"]


# ---- validation before any weight is touched ------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(window=0), "window=0"),
        (dict(window=8, overlap=8), "overlap=8"),
        (dict(overlap=-1), "overlap=-1"),
        (dict(layers=[]), "layers` is empty"),
        (dict(layers=[2, 4]), r"\[4\] are out of range.*0\.\.3"),
        (dict(layers=[-1, 2]), "out of range"),
        (dict(layers=[2, 1]), "ascending"),
        (dict(layers=[1, 1, 2]), "duplicates"),
        (dict(layers=[1, 2], loss_layer=1), "loss_layer=1 must lie between the z-layer"),
        (dict(layers=[1, 2], loss_layer=4), "loss_layer=4"),
        (dict(chunking="sentences"), "chunking="),
        (dict(v_steps=0), "v_steps"),
    ],
)
def test_invalid_config_is_refused_before_any_weight_is_touched(config, message, tok):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(EditConfigError, match=message):
        AnyEditModule(model, tok, REQUESTS, EditConfig(**{**BASE, **config}))
    assert changed(model, before) == []


def test_invalid_requests_are_refused(tok):
    model = tiny_model("llama")
    with pytest.raises(RequestError, match="target is empty"):
        AnyEditModule(model, tok, [EditRequest("Who?", "")], EditConfig(**BASE))
    with pytest.raises(RequestError, match="prompt must be a string"):
        EditRequest(["Who?"], "An answer.")
    with pytest.raises(EditConfigError, match="No edit requests"):
        AnyEditModule(model, tok, [], EditConfig(**BASE))
    with pytest.raises(EditConfigError, match="request 1 is a tuple"):
        AnyEditModule(model, tok, [REQUESTS[0], ("Who?", "An answer.")], EditConfig(**BASE))


@pytest.mark.parametrize("family", FAMILIES)
def test_request_longer_than_the_context_is_refused(family, tok):
    model = tiny_model(family, max_positions=48)
    before = snapshot(model)
    with pytest.raises(
        EditConfigError, match=r"request 0 is \d+ tokens long, more than the model's context \(48\)"
    ):
        run(model, tok, REQUESTS)
    assert changed(model, before) == []


def test_unknown_architecture_is_refused(tok):
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedArchitectureError, match="(?s)model_type='mystery'.*register_architecture"):
        AnyEditModule(model, tok, REQUESTS, EditConfig(**BASE))
    wrong = ArchitectureSpec("model.blocks", "model.blocks.{}.ffn.w2", "model.norm", "lm_head")
    with pytest.raises(UnsupportedArchitectureError, match="do not match"):
        AnyEditModule(tiny_model("llama"), tok, REQUESTS, EditConfig(**BASE), architecture=wrong)


def test_first_key_content_end_moves_only_the_first_key(tok):
    """``first_key="content_end"``: chunk 0's δ sits on the last token of the user's text, before the chat
    template's closing markup; the other keys and every chunk's labels stay where they were."""
    request = REQUESTS[0]
    tokenized = tokenize_request(tok, request)
    after = tok(
        tok.apply_chat_template(
            [{"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True
        ).split("Q", 1)[1],
        add_special_tokens=False,
    )
    n_markup = len(after["input_ids"])
    assert tokenized.content_end == tokenized.prompt_len - n_markup - 1
    plain, moved = (
        plan_requests(tok, [request], EditConfig(layers=[2], window=8, first_key=key))[0]
        for key in ("prompt_end", "content_end")
    )
    assert plain.keys[0] == tokenized.prompt_len - 1 and moved.keys[0] == tokenized.content_end
    assert moved.keys[1:] == plain.keys[1:]


def test_first_key_content_word_skips_trailing_punctuation(tok):
    """``"content_word"``: the question mark every question ends with is skipped for the last word."""
    tokenized = tokenize_request(tok, REQUESTS[0])  # "Who is Ada Quill?"
    assert tok.decode([tokenized.prompt_ids[tokenized.content_end]]).strip() == "?"
    assert tokenized.content_word < tokenized.content_end
    assert "Quill".endswith(tok.decode([tokenized.prompt_ids[tokenized.content_word]]).strip())
    no_mark = tokenize_request(tok, EditRequest("Tell me about Ada Quill", "Ada."))
    assert no_mark.content_word == no_mark.content_end
    plan = plan_requests(tok, [REQUESTS[0]], EditConfig(layers=[2], window=8, first_key="content_word"))[0]
    assert plan.keys[0] == tokenized.content_word


def test_tokenized_first_key_names_the_planned_position(tok):
    """``TokenizedRequest.first_key`` (what the tutorials draw) is where planning puts chunk 0's key, and a raw
    prompt, which has no user text to move to, keeps the last prompt token."""
    tokenized = tokenize_request(tok, REQUESTS[0])
    for kind in ("prompt_end", "content_end", "content_word"):
        plan = plan_requests(tok, [REQUESTS[0]], EditConfig(layers=[2], window=8, first_key=kind))[0]
        assert plan.keys[0] == tokenized.first_key(kind)
    assert len({tokenized.first_key(k) for k in ("prompt_end", "content_end", "content_word")}) == 3
    raw = tokenize_request(tok, EditRequest("Ada Quill is", " a poet.", raw_prompt=True))
    assert raw.first_key("content_word") == raw.first_key("content_end") == raw.prompt_len - 1


def test_question_variants_keep_the_target_and_move_the_keys(tok):
    """Each variant leaves words of the prompt out (never its names), answers with the same target tokens,
    and keys the same chunks: the answer keys shift with the prompt, chunk 0's sits on the variant's own
    last word."""
    request = EditRequest(
        "Who is the famous glassblower Ada Quill of Vormund?", "Ada Quill built the tide clock."
    )
    plan = plan_requests(tok, [request], EditConfig(layers=[2], window=4, first_key="content_word"))[0]
    variants = question_variants(tok, plan, "content_word", 3, 0.3)
    assert len(variants) == 3 and len({v.tokenized.request.prompt for v in variants}) == 3
    words = request.prompt.split()
    for variant in variants:
        kept = variant.tokenized.request.prompt.split()
        assert 2 <= len(kept) < len(words) and all(w in words for w in kept)
        assert {"Ada", "Quill", "Vormund?"} <= set(kept)  # names are kept: still the same question's subject
        assert variant.tokenized.target_ids == plan.tokenized.target_ids and variant.chunks == plan.chunks
        shift = variant.tokenized.prompt_len - plan.tokenized.prompt_len
        assert variant.keys[1:] == [k + shift for k in plan.keys[1:]]
        assert variant.keys[0] == variant.tokenized.content_word
    assert question_variants(tok, plan, "content_word", 3, 0.3)[0].tokenized.ids == variants[0].tokenized.ids
    assert dropped_words("Who is?", 3, 0.5) == [] and dropped_words(request.prompt, 0, 0.5) == []
    raw = plan_requests(tok, [EditRequest("Q: who? A:", "x", raw_prompt=True)], EditConfig(layers=[2]))[0]
    assert question_variants(tok, raw, "prompt_end", 2, 0.3) == []


def test_unke_question_variants_fit_the_residuals_on_the_variants_too(tok, monkeypatch):
    """With variants the edit term has their sequences, each key taking its request's residual row."""
    seen = {}
    original = UnkeWrite._layer_terms

    def spy(self, module, layer_index, edit, preserve):
        seen["edit"], seen["plans"] = edit, module.plans
        return original(self, module, layer_index, edit, preserve)

    monkeypatch.setattr(UnkeWrite, "_layer_terms", spy)
    model = tiny_model("llama")
    before = snapshot(model)
    module = _small_unke_edit(model, tok, question_variants=2)
    ids, _mask, rows, cols, dz = seen["edit"]
    plans = module.plans
    assert ids.shape[0] == len(plans) + 2 * len(plans)  # both prompts have at least three words
    keys = sum(len(p.keys) for p in plans)
    residuals = dz[:keys]
    for r, plan in enumerate(plans):
        first = sum(len(p.keys) for p in plans[:r])
        variant_rows = [
            i for i in range(keys, len(rows)) if int(rows[i]) in (len(plans) + 2 * r, len(plans) + 2 * r + 1)
        ]
        assert len(variant_rows) == 2 * len(plan.keys)
        for j, i in enumerate(variant_rows):
            assert torch.equal(dz[i], residuals[first + j % len(plan.keys)])
            assert ids[rows[i], cols[i] + 1] == ids[r, plan.keys[j % len(plan.keys)] + 1]  # same next token
    assert changed(model, before)
    with pytest.raises(WriterConfigError, match="variant_drop"):
        UnkeWrite(variant_drop=1.0)
    with pytest.raises(WriterConfigError, match="question_variants"):
        UnkeWrite(question_variants=-1)
