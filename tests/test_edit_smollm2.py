"""End-to-end edits on the embedded SmolLM2 (issue 3): long fictional targets the model cannot know.

CI runs one request with the recommended configuration (the preset's method) and checks what the edit did
to unrelated answers (one UnKE+AnyEdit edit is about ten minutes on a slow 2-core CPU, most of it UnKE's
write); set ``ANYEDIT_FULL_E2E=1`` to run all three requests (one of them code) and every method against
its single-token baseline.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

from anyedit_lightning import EditRequest, compute_covariance, edit, get_preset
from anyedit_lightning.core.requests import prompt_text
from anyedit_lightning.evaluation import FaithfulnessOptions, edit_report, generate_batch
from anyedit_lightning.metrics import rouge_l_recall

pytestmark = pytest.mark.smollm2

FICTIONAL = Path(__file__).resolve().parents[1] / "data" / "fictional_edits.json"
REQUESTS = [
    EditRequest(r["prompt"], r["target"])
    for r in json.loads(FICTIONAL.read_text(encoding="utf-8"))["records"]
]
FULL = os.environ.get("ANYEDIT_FULL_E2E") == "1"


def _regenerate(model, tokenizer, request: EditRequest) -> str:
    n = len(tokenizer(request.target)["input_ids"])
    return generate_batch(model, tokenizer, [prompt_text(tokenizer, request)], max_new_tokens=n + 30)[0].text


PRESET = get_preset("smollm2-135m-instruct")
#: Probe sizes for the locality check: 24 everyday prompts and 2,048 held-out tokens (docs/faithful.md).
LOCALITY = FaithfulnessOptions(
    locality_prompts=24, cross_questions=0, neighbours=0, fluency_prompts=0, perplexity_tokens=2048
)


@pytest.fixture(scope="module")
def smol(smollm2):
    model, tokenizer = smollm2
    layers = sorted(set(PRESET.config("memit", True).layers) | set(PRESET.config("memit", False).layers))

    @functools.cache
    def stats():  # only the covariance writers need them, computed on the unedited weights
        return compute_covariance(
            model, tokenizer, layers, corpus=PRESET.stats_corpus("memit"), max_tokens=PRESET.stats_tokens
        )

    base = {k: v.clone() for k, v in model.state_dict().items()}
    yield model, tokenizer, stats
    model.load_state_dict(base)


def _edit_and_score(smol, request, method, anyedit, report=False):
    """ROUGE-L recall of the regenerated answer, and (``report``) the edit's locality report."""
    model, tokenizer, stats = smol
    base = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        module = edit(
            model,
            tokenizer,
            request,
            method=method,
            anyedit=anyedit,
            stats=stats() if method != "unke" else None,
            trainer_kwargs=dict(enable_progress_bar=False, logger=False),
        )
        rouge = rouge_l_recall(_regenerate(model, tokenizer, request), request.target)
        return rouge, edit_report(model, tokenizer, module, options=LOCALITY) if report else None
    finally:
        with torch.no_grad():
            model.load_state_dict(base)


@pytest.mark.parametrize("request_index", range(len(REQUESTS)) if FULL else [0])
def test_recommended_edit_takes_and_leaves_unrelated_answers_alone(smol, request_index):
    """The default method and preset: the long target comes back while the unedited model's answers to
    everyday prompts and held-out text barely move (the old preset, δ on the template's last token and 4x
    the hidden norm, scored agreement 0.5-0.7 and perplexity 1.2-1.4x)."""
    request = REQUESTS[request_index]
    tokens = len(smol[1](request.target)["input_ids"])
    assert tokens >= 150, tokens
    method = PRESET.method
    anyedit, report = _edit_and_score(smol, request, method, True, report=True)
    print(
        f"request {request_index}: {method}+AnyEdit ROUGE-L {anyedit:.3f}, "
        f"locality agreement {report.locality_agreement:.3f}, perplexity x{report.perplexity_ratio:.3f}"
    )
    assert anyedit >= 0.8, f"{method}+AnyEdit reached ROUGE-L recall {anyedit:.3f} < 0.8"
    assert report.locality_agreement >= 0.85, report.locality_agreement
    assert report.perplexity_ratio <= 1.03, report.perplexity_ratio


@pytest.mark.skipif(not FULL, reason="set ANYEDIT_FULL_E2E=1 (slow: every method on every request)")
@pytest.mark.parametrize("method", ["memit", "alphaedit", "unke"])
@pytest.mark.parametrize("request_index", range(len(REQUESTS)))
def test_every_anyedit_variant_beats_its_baseline(smol, method, request_index):
    request = REQUESTS[request_index]
    anyedit, _ = _edit_and_score(smol, request, method, True)
    baseline, _ = _edit_and_score(smol, request, method, False)
    print(f"request {request_index}: {method}+AnyEdit {anyedit:.3f}, {method} {baseline:.3f}")
    assert anyedit > baseline
