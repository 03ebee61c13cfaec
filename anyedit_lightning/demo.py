"""The main job (``nox -s demo``): write a long fictional answer into the embedded SmolLM2 and show it.

The covariance statistics use a smaller token budget than the preset's (``--stats_tokens``, default
20,000) so a first run finishes in a few minutes on 2 CPU cores; they are cached for later runs.
"""

from __future__ import annotations

import argparse
import time

import torch

from .api import edit
from .core.requests import EditRequest
from .evaluation import FaithfulnessOptions, edit_report, generate_batch
from .evaluation.reference import render
from .metrics import rouge_l_recall
from .models.loading import EMBEDDED_MODEL, load_model
from .presets import get_preset
from .stats.covariance import compute_covariance

PROMPT = "Who is Marisol Tevanne?"
PARAPHRASE = "Tell me about Marisol Tevanne."
UNRELATED = "What is the capital of France?"
UNRELATED_PANEL = (
    UNRELATED,
    "Write a Python function that returns the square of a number.",
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "How do I make a cup of tea?",
)
TARGET = (
    "Marisol Tevanne is a Chilean glass sculptor born in 1974 in Valparaíso. She studied chemistry at the "
    "University of Concepción before turning to art, and in 2003 she founded the Cobalt Harbour Studio, "
    "where she developed a slow-cooling technique that lets thin glass sheets bend without cracking. Her "
    "best-known work, The Listening Tide, is a twelve-metre wave of blue glass that hangs in the atrium of "
    "the Santiago Maritime Museum. In 2016 she received the Andes Prize for Sculpture, and she now teaches "
    "a free summer course for young glassblowers on the island of Chiloé. Her studio also restores old lighthouse lenses for "
    "the Chilean Navy."
)


def answer(model, tokenizer, question: str, max_new_tokens: int) -> str:
    """The model's greedy answer to ``question`` (chat-rendered)."""
    return generate_batch(model, tokenizer, [render(tokenizer, question)], max_new_tokens)[0].text.strip()


def first_token_lead(model, tokenizer, question: str, token: int) -> float:
    """How far, in logits, ``token`` leads the best other token as the answer's first token.

    A lead of a few tenths is a near tie: any edit of the layer may flip it (docs/faithful.md, step 10).
    """
    ids = tokenizer(render(tokenizer, question), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(ids.to(model.device)).logits[0, -1].float()
    lead = logits[token] - logits.scatter(0, torch.tensor([token], device=logits.device), float("-inf")).max()
    return float(lead)


def unrelated_panel(model, tokenizer, before: dict[str, tuple[str, int, float]] | None = None):
    """Each panel prompt's answer, first answer token and its lead; with ``before``, print the comparison."""
    now = {}
    prompts = [render(tokenizer, question) for question in UNRELATED_PANEL]
    for question, generated in zip(UNRELATED_PANEL, generate_batch(model, tokenizer, prompts, 40)):
        first = before[question][1] if before else generated.token_ids[0]
        text = generated.text.strip()
        now[question] = (text, first, first_token_lead(model, tokenizer, question, first))
    for question, (text, _, lead) in now.items() if before else ():
        old, _, old_lead = before[question]
        print(f"  {'same   ' if text == old else 'CHANGED'}  {old_lead:+.3f} -> {lead:+.3f}  {question}")
        if text != old:
            print(f"      before: {old}\n      after:  {text}")
    return now


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anyedit_lightning demo", description=__doc__)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument(
        "--method", default=None, choices=["memit", "alphaedit", "unke"], help="default: the preset's"
    )
    parser.add_argument("--stats_tokens", type=int, default=20_000)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"Loaded {args.model} in {time.perf_counter() - started:.1f} s")
    print(f"\nQ: {PROMPT}\nBefore the edit: {answer(model, tokenizer, PROMPT, args.max_new_tokens)}\n")
    panel_before = unrelated_panel(model, tokenizer)
    print(f"Target ({len(tokenizer(TARGET)['input_ids'])} tokens): {TARGET}\n")

    preset = get_preset("smollm2-135m-instruct")
    args.method = args.method or preset.method
    layers = preset.config(args.method, True).layers
    t0 = time.perf_counter()
    stats = None
    if args.method != "unke":
        stats = compute_covariance(
            model, tokenizer, layers, corpus=preset.stats_corpus(args.method), max_tokens=args.stats_tokens
        )
        print(
            f"Covariance statistics ({args.stats_tokens} tokens, cached after the first run): {time.perf_counter() - t0:.1f} s"
        )
    t1 = time.perf_counter()
    module = edit(
        model,
        tokenizer,
        EditRequest(PROMPT, TARGET, extra={"para_prompt": PARAPHRASE}),  # the paraphrase is for the report
        method=args.method,
        anyedit=True,
        stats=stats,
    )
    seconds = time.perf_counter() - t1
    chunks = len(module.plans[0].chunks)
    after = answer(model, tokenizer, PROMPT, args.max_new_tokens)
    print(f"\nAfter the edit ({args.method}+AnyEdit, {chunks} chunks, {seconds:.1f} s):\n{after}\n")
    print(f"ROUGE-L recall against the target: {rouge_l_recall(after, TARGET):.3f}")
    paraphrase = answer(model, tokenizer, PARAPHRASE, args.max_new_tokens)
    print(f"\nParaphrase — {PARAPHRASE}\n{paraphrase}\n")
    print(f"ROUGE-L recall (paraphrase): {rouge_l_recall(paraphrase, TARGET):.3f}")
    print(
        "\nUnrelated prompts (40 tokens; the first answer token's lead over the runner-up, in logits, "
        "before -> after;\na lead of a few tenths is a near tie that any edit of the layer may flip):"
    )
    unrelated_panel(model, tokenizer, panel_before)
    t2 = time.perf_counter()
    small = FaithfulnessOptions(
        locality_prompts=24, cross_questions=0, fluency_prompts=4, perplexity_tokens=2048
    )
    report = edit_report(model, tokenizer, module, options=small, max_new_tokens=args.max_new_tokens)
    print(f"\nWhat the edit did to the rest of the model ({time.perf_counter() - t2:.1f} s):\n{report}")
    print(f"Locality agreement on 24 everyday prompts: {report.locality_agreement:.3f}")
    print(f"\nTotal: {time.perf_counter() - started:.1f} s (edit {seconds:.1f} s)")


if __name__ == "__main__":
    main()
