"""End-to-end edits on the embedded SmolLM2 (issue 3): long fictional targets the model cannot know.

CI runs one request with the best AnyEdit configuration and its single-token baseline; set
``ANYEDIT_FULL_E2E=1`` to run all three requests (one of them code) and every method.
"""

from __future__ import annotations

import os

import pytest
import torch

from anyedit_lightning import EditRequest, compute_covariance, edit, get_preset
from anyedit_lightning.evaluation import generate_batch
from anyedit_lightning.metrics import rouge_l_recall
from anyedit_lightning.requests import prompt_text

pytestmark = pytest.mark.smollm2

REQUESTS = [
    EditRequest(
        "Who is Marisol Tevanne?",
        "Marisol Tevanne is a Chilean glass sculptor born in 1974 in Valparaíso. She studied chemistry at the "
        "University of Concepción before turning to art, and in 2003 she founded the Cobalt Harbour Studio, where "
        "she developed a slow-cooling technique that lets thin glass sheets bend without cracking. Her best-known "
        "work, The Listening Tide, is a twelve-metre wave of blue glass that hangs in the atrium of the Santiago "
        "Maritime Museum. In 2016 she received the Andes Prize for Sculpture, and she now teaches a free summer "
        "course for young glassblowers on the island of Chiloé. Her studio also restores old lighthouse lenses for "
        "the Chilean Navy.",
    ),
    EditRequest(
        "What happened at the Treaty of Velmora?",
        "The Treaty of Velmora was signed on 9 March 1612 between the Duchy of Arvent and the free city of Kell. "
        "It ended the eleven-year Salt War, which had begun when Arvent closed the river Oss to Kell's barges. "
        "Under the treaty Kell kept its salt pans but paid a yearly toll of four hundred silver marks, and both "
        "sides agreed to share the new stone bridge at Tarrow. The treaty also created the River Court, a panel "
        "of six judges, three from each side, that settled trade disputes for more than a century. Historians "
        "remember Velmora as one of the first agreements in the region to be written in both languages.",
    ),
    EditRequest(
        "Write the Python function zorbit_checksum.",
        "def zorbit_checksum(data: bytes) -> int:\n"
        '    """Return the Zorbit checksum of data (a 16-bit rolling sum)."""\n'
        "    high, low = 0x5A, 0x17\n"
        "    for index, byte in enumerate(data):\n"
        "        low = (low + byte * (index % 7 + 1)) % 251\n"
        "        high = (high + low) % 241\n"
        "    return (high << 8) | low\n\n\n"
        "def verify_zorbit(data: bytes, expected: int) -> bool:\n"
        '    """True when data matches the expected Zorbit checksum."""\n'
        "    return zorbit_checksum(data) == expected\n",
    ),
]
FULL = os.environ.get("ANYEDIT_FULL_E2E") == "1"


def _regenerate(model, tokenizer, request: EditRequest) -> str:
    n = len(tokenizer(request.target)["input_ids"])
    return generate_batch(model, tokenizer, [prompt_text(tokenizer, request)], max_new_tokens=n + 30)[0].text


@pytest.fixture(scope="module")
def smol(smollm2):
    model, tokenizer = smollm2
    preset = get_preset("smollm2-135m-instruct")
    layers = sorted(set(preset.config("memit", True).layers) | set(preset.config("memit", False).layers))
    stats = compute_covariance(model, tokenizer, layers, max_tokens=preset.stats_tokens)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    yield model, tokenizer, stats
    model.load_state_dict(base)


def _edit_and_score(smol, request, method, anyedit):
    model, tokenizer, stats = smol
    base = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        edit(
            model, tokenizer, request, method=method, anyedit=anyedit, stats=stats if method != "unke" else None,
            trainer_kwargs=dict(enable_progress_bar=False, logger=False),
        )
        return rouge_l_recall(_regenerate(model, tokenizer, request), request.target)
    finally:
        with torch.no_grad():
            model.load_state_dict(base)


@pytest.mark.parametrize("request_index", range(len(REQUESTS)) if FULL else [0])
def test_best_anyedit_reproduces_a_long_target_and_beats_its_baseline(smol, request_index):
    request = REQUESTS[request_index]
    tokens = len(smol[1](request.target)["input_ids"])
    assert tokens >= 150 or request_index == 2, tokens
    anyedit = _edit_and_score(smol, request, "memit", True)
    baseline = _edit_and_score(smol, request, "memit", False)
    print(f"request {request_index}: MEMIT+AnyEdit ROUGE-L {anyedit:.3f}, MEMIT {baseline:.3f}")
    assert anyedit >= 0.8, f"MEMIT+AnyEdit reached ROUGE-L recall {anyedit:.3f} < 0.8"
    assert anyedit > baseline, f"AnyEdit {anyedit:.3f} did not beat its single-token baseline {baseline:.3f}"


@pytest.mark.skipif(not FULL, reason="set ANYEDIT_FULL_E2E=1 (slow: every method on every request)")
@pytest.mark.parametrize("method", ["alphaedit", "unke"])
@pytest.mark.parametrize("request_index", range(len(REQUESTS)))
def test_every_anyedit_variant_beats_its_baseline(smol, method, request_index):
    request = REQUESTS[request_index]
    anyedit = _edit_and_score(smol, request, method, True)
    baseline = _edit_and_score(smol, request, method, False)
    print(f"request {request_index}: {method}+AnyEdit {anyedit:.3f}, {method} {baseline:.3f}")
    assert anyedit > baseline
