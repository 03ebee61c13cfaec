"""Faithfulness measures on tiny models: locality/neighbourhood, fluency, held-out perplexity, sub-facts."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from tiny import build_tokenizer, poet_records, tiny_model

import anyedit_lightning.evaluation.reference as reference_module
from anyedit_lightning.core.module import EditRecord
from anyedit_lightning.core.requests import EditRequest
from anyedit_lightning.core.weights import weights_swapped
from anyedit_lightning.evaluation.edit_report import EditReport, edit_report
from anyedit_lightning.evaluation.faithfulness import FaithfulnessOptions
from anyedit_lightning.evaluation.probes import cross_benchmark_questions, locality_prompts, nearest_prompts
from anyedit_lightning.evaluation.reference import answers_cache_path, reference_answers
from anyedit_lightning.metrics import (
    DEGENERATE_THRESHOLD,
    Fluency,
    LocalityAgreement,
    PerplexityRatio,
    SubFactHits,
    TopK,
    coarse_kl,
    heldout_batches,
    is_degenerate,
    repetition,
    subfact_hit,
    total_nll,
)
from anyedit_lightning.models.fingerprint import weights_fingerprint
from anyedit_lightning.stats.corpus import (
    HELDOUT_ARTICLES,
    wikipedia_articles,
    wikipedia_heldout,
    wikipedia_sample,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DOWN = "model.layers.2.mlp.down_proj.weight"
SMALL = FaithfulnessOptions(
    locality_prompts=8,
    cross_questions=3,
    neighbours=3,
    fluency_prompts=3,
    perplexity_tokens=300,
    reference_tokens=10,
    top_k=32,
)
REQUEST = EditRequest(
    "Who is the poet number 1?",
    "The poet number 1 lives in Paris. The tower is in the city, on the Seine.",
    extra={
        "para_prompt": "Tell me about poet 1.",
        "sub_questions": ["Where does the poet live?"],
        "sub_answers": ["Paris"],
    },
)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYEDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def fake_module(model, names=(DOWN,)):
    """What a finished edit leaves: its requests and the touched tensors before the write."""
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    return SimpleNamespace(requests=[REQUEST], edit_record=EditRecord("test", before))


# ---- locality and neighbourhood -------------------------------------------------------------------------


def test_noop_edit_scores_perfect_locality(tokenizer):
    model = tiny_model("llama")
    report = edit_report(model, tokenizer, fake_module(model), options=SMALL, max_new_tokens=8)
    assert isinstance(report, EditReport)
    assert report.locality_agreement == 1.0 and report.locality_kl == 0.0
    assert report.cross_agreement is None or (report.cross_agreement == 1.0 and report.cross_kl == 0.0)
    assert report.neighbourhood_agreement == 1.0 and report.neighbourhood_kl == 0.0
    assert report.perplexity_ratio == 1.0
    assert report.subfact_hits is not None and report.paraphrase_rougeL is not None
    assert "Locality top-1 agreement" in str(report)


def test_destructive_write_is_caught_and_weights_are_kept(tokenizer):
    model = tiny_model("llama")
    module = fake_module(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        params[DOWN].add_(torch.randn(params[DOWN].shape, generator=torch.Generator().manual_seed(0)) * 50.0)
    edited = params[DOWN].detach().clone()
    report = edit_report(model, tokenizer, module, options=SMALL, max_new_tokens=8)
    assert report.locality_agreement < 0.9
    assert report.locality_kl > 1e-3  # random tiny models are near-uniform: small but clearly non-zero
    assert report.neighbourhood_agreement is not None and report.neighbourhood_agreement < 1.0
    assert report.perplexity_ratio != 1.0  # a random model has no meaningful direction: see the SmolLM2 test
    assert torch.equal(params[DOWN], edited)  # the edited weights are back, bit-exactly


def test_replayed_lower_layers_and_shared_prefix_give_the_same_scores(tokenizer):
    from anyedit_lightning.evaluation.faithfulness import FaithfulnessProbe
    from anyedit_lightning.metrics.forced import forced_logprobs

    model = tiny_model("llama")
    probe = FaithfulnessProbe(model, tokenizer, None, SMALL).prepare([REQUEST.prompt])
    items = probe.sets["locality"].items
    full = dict(forced_logprobs(model, items, 4))
    shared = dict(forced_logprobs(model, items, 4, probe._prefix()))
    assert probe._template and all(torch.allclose(full[i], shared[i], atol=1e-4) for i in full)
    before = fake_module(model).edit_record.before
    unchanged = [probe.measure_edit(touched=before.keys()) for _ in range(2)]  # recorded, then replayed
    assert all(u["locality_agreement"] == 1.0 and u["locality_kl"] == 0.0 for u in unchanged)
    assert unchanged[1]["perplexity_ratio"] == 1.0
    params = dict(model.named_parameters())
    with torch.no_grad():
        params[DOWN].add_(torch.randn(params[DOWN].shape, generator=torch.Generator().manual_seed(0)))
    rerun, replayed = probe.measure_edit(), probe.measure_edit(touched=before.keys())
    keys = ("locality_agreement", "locality_kl", "cross_kl", "perplexity_ratio")
    assert all(rerun.get(k) == replayed.get(k) for k in keys) and rerun["locality_kl"] > 0
    assert probe.measure_neighbourhood(REQUEST.prompt, before)["neighbourhood_kl"] > 0


def test_coarse_kl_is_zero_for_equal_and_positive_for_different():
    logp = torch.log_softmax(torch.randn(5, 50, generator=torch.Generator().manual_seed(1)), -1)
    values, ids = logp.topk(8, -1)
    reference = TopK(ids, values)
    assert torch.equal(coarse_kl(reference, logp), torch.zeros(5, dtype=torch.float64))
    other = torch.log_softmax(logp * 3.0, -1)
    assert (coarse_kl(reference, other) > 0).all()
    metric = LocalityAgreement()
    metric.update(logp, reference)
    assert metric.compute()["agreement"] == 1.0
    with pytest.raises(ValueError):
        metric.update(logp[:3], reference)


def test_weights_swap_restores_bit_exactly_on_error():
    model = tiny_model("llama")
    params = dict(model.named_parameters())
    current = params[DOWN].detach().clone()
    with pytest.raises(RuntimeError), weights_swapped(model, {DOWN: torch.zeros_like(current)}):
        assert not params[DOWN].any()
        raise RuntimeError("boom")
    assert torch.equal(params[DOWN], current)


def test_reference_answers_are_cached_and_rebuilt_when_corrupted(tokenizer, monkeypatch, caplog):
    model = tiny_model("llama")
    calls = []
    real = reference_module.generate_batch

    def counting(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(reference_module, "generate_batch", counting)
    prompts = ["What is the capital of France?", "Who wrote Hamlet?"]
    first = reference_answers(model, tokenizer, prompts, max_new_tokens=6)
    assert calls == [2]
    assert reference_answers(model, tokenizer, prompts, max_new_tokens=6) == first
    assert calls == [2]  # reused from disk
    path = answers_cache_path(weights_fingerprint(model), 6)
    wrapper = json.loads(path.read_text())
    key = next(iter(wrapper["data"]["answers"]))
    wrapper["data"]["answers"][key]["ids"] = [5, 5, 5]
    path.write_text(json.dumps(wrapper))
    with caplog.at_level(logging.WARNING):
        again = reference_answers(model, tokenizer, prompts, max_new_tokens=6)
    assert calls == [2, 2] and again == first
    assert "checksum" in caplog.text


def test_probe_sets():
    prompts = locality_prompts()
    assert len(prompts) >= 60 and len({p.domain for p in prompts}) >= 8
    assert len({p.domain for p in prompts[:10]}) == 10  # round-robin: any prefix spans the domains
    cross = cross_benchmark_questions("unkebench", 24)
    assert len(cross) == 24 and cross == cross_benchmark_questions("unkebench", 24)
    assert set(cross).isdisjoint(cross_benchmark_questions("mquake_cf", 24))
    pool = ["What is the capital of Italy?", "How do I boil an egg?", "Which city is the capital of Spain?"]
    near = nearest_prompts("What is the capital of France?", pool + ["What is the capital of France?"], k=2)
    assert near == ["What is the capital of Italy?", "Which city is the capital of Spain?"]


# ---- fluency -----------------------------------------------------------------------------------------

PROSE = (
    "The Eiffel Tower was built for the 1889 World's Fair in Paris. At first many artists disliked it, but "
    "it soon became the symbol of the city. Today millions of visitors climb its stairs or take the lifts "
    "to the top, where on a clear day they can see the river, the old palaces and the hills beyond."
)
CODE = "def maximum(values):\n    best = values[0]\n    for value in values[1:]:\n        if value > best:\n            best = value\n    return best\n"


@pytest.mark.parametrize(
    "text",
    [
        "A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A",
        "the cat the cat the cat the cat the cat",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_degenerate_answers_are_flagged(text):
    assert is_degenerate(text)


@pytest.mark.parametrize("text", [PROSE, CODE, "Paris.", "The capital of France is Paris.", ""])
def test_normal_text_is_not_flagged(text):
    assert repetition(text) <= DEGENERATE_THRESHOLD and not is_degenerate(text)


def test_fluency_metric():
    metric = Fluency()
    metric.update([PROSE, "A.A.A.A.A.A.A.A.A.A.A.A.A.A.A.A"])
    scores = metric.compute()
    assert scores["degenerate"] == 0.5 and 0 < scores["repetition"] < 1


# ---- perplexity ------------------------------------------------------------------------------------------


def test_heldout_articles_are_disjoint_from_the_statistics_corpus():
    articles, sample, heldout = list(wikipedia_articles()), list(wikipedia_sample()), wikipedia_heldout()
    assert len(heldout) == HELDOUT_ARTICLES and sample + heldout == articles
    assert set(sample).isdisjoint(heldout)
    assert sum(len(t) for t in heldout) >= 4 * 20_000  # >= 20K tokens at ~4 characters per token


@pytest.mark.smollm2
def test_perplexity_ratio_on_smollm2_is_one_unchanged_and_rises_with_noise(smollm2):
    model, tokenizer = smollm2
    batches = heldout_batches(tokenizer, 256)
    reference, count = total_nll(model, batches)
    unchanged = PerplexityRatio(reference / count)
    unchanged.update(*total_nll(model, batches))
    assert unchanged.compute() == 1.0
    name = "model.layers.10.mlp.down_proj.weight"
    weight = dict(model.named_parameters())[name]
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.2
    with weights_swapped(model, {name: weight.detach() + noise}):
        noisy = PerplexityRatio(reference / count)
        noisy.update(*total_nll(model, batches))
    assert noisy.compute() > 1.05


def test_perplexity_ratio_metric():
    metric = PerplexityRatio(reference_nll=2.0)
    assert torch.isnan(metric.compute())
    metric.update(20.0, 10)
    assert metric.compute() == 1.0
    metric.update(30.0, 10)
    assert metric.compute() > 1.0


# ---- sub-facts -------------------------------------------------------------------------------------------


def test_subfact_hits():
    assert subfact_hit("She lives in Paris, France.", "Paris")
    assert subfact_hit("It is in the city centre", "in the city")  # stopwords dropped: needs "city"
    assert not subfact_hit("She lives in Lyon.", "Paris")
    assert subfact_hit("Written by Shakespeare.", "William Shakespeare")  # half of the content words
    assert not subfact_hit("Born in 1975", "1974")
    metric = SubFactHits()
    metric.update(["Paris!", "no idea"], ["paris", "London"])
    assert metric.compute() == 0.5 and metric.per_item() == [1.0, 0.0]


def test_poet_records_shape():
    assert poet_records(1)[0]["sub_answer"] == ["Paris", "in the city"]


# ---- the benchmark runner --------------------------------------------------------------------------------


def test_runner_records_and_reports_faithfulness(tmp_path, tokenizer):
    from anyedit_lightning.evaluation.runner import BenchConfig, run_benchmark

    data = tmp_path / "edits.json"
    data.write_text(json.dumps(poet_records(2)), encoding="utf-8")
    common = dict(
        model="tiny-llama",
        preset="smollm2-135m-instruct",
        dataset=str(data),
        max_new_tokens=6,
        edit={"layers": [1, 2], "v_steps": 2},
        out=str(tmp_path / "out"),
        similarity=False,
        progress_bar=False,
        locality_prompts=6,
        cross_questions=2,
        neighbours=2,
        fluency_prompts=2,
        perplexity_tokens=200,
    )
    model = tiny_model("llama")
    unedited = run_benchmark(BenchConfig(method="none", **common), model, tokenizer)
    f = unedited["faithfulness"]
    assert f["locality_agreement"] == 1.0 and f["locality_kl"] == 0.0
    assert f["neighbourhood_agreement"] == 1.0 and f["perplexity_ratio"] == 1.0
    assert f["subfact_hits"] is not None
    edited = run_benchmark(BenchConfig(method="unke", writer={"steps": 3}, **common), model, tokenizer)
    assert edited["faithfulness"]["locality_kl"] > 0.0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "faithfulness" in table and "Locality agr." in table
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert all("faithfulness" in row for row in summary["results"])
    off = run_benchmark(
        BenchConfig(method="none", **{**common, "out": str(tmp_path / "off")}, faithfulness=False),
        model,
        tokenizer,
    )
    assert off["faithfulness"] is None
