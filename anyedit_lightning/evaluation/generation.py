"""Greedy, batched generation for the benchmark (docs/algorithm.md §6): left padding, stop at end of turn.

Prompts are given already rendered (see :func:`anyedit_lightning.core.requests.prompt_text`), so generation
sees exactly the text an edit was written for. Batched and one-at-a-time generation give the same texts:
left padding keeps every prompt's last token at the end of its row, and the attention mask (from which
``generate`` derives the position ids) hides the padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..core.requests import end_of_turn_id


@dataclass(frozen=True)
class Generation:
    """One answer: the decoded text (special tokens skipped) and whether the model ended it itself.

    ``stopped`` is False when the answer was cut at ``max_new_tokens``.
    """

    text: str
    stopped: bool
    num_tokens: int
    token_ids: tuple[int, ...] = ()  # the kept answer tokens (stop token excluded), for teacher forcing


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS and the chat template's end-of-turn token (deduplicated, order kept)."""
    ids: list[int] = []
    for token in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    return ids


def _pad_id(tokenizer: PreTrainedTokenizerBase, stops: Sequence[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return stops[0] if stops else 0


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 512,
    batch_size: int | None = None,
) -> list[Generation]:
    """Greedy answers to already-rendered ``prompts``, in input order.

    Args:
        model: a causal LM with ``generate``; its device is used.
        tokenizer: the model's tokenizer; its ``padding_side`` is set to left for the call and restored.
        prompts: prompt texts exactly as the model should see them (chat-rendered already).
        max_new_tokens: the answer length limit (the paper: 512).
        batch_size: at most this many prompts per ``generate`` call (None: all at once). Prompts are
            grouped by length to waste little on padding; the output order is the input order.

    Example:
        >>> [g.text for g in generate_batch(model, tok, [prompt_text(tok, r) for r in requests], 64)]
    """
    prompts = list(prompts)
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive or None, got {batch_size}")
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    pad = _pad_id(tokenizer, stops)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stops or None,
        pad_token_id=pad,
    )
    # The prompt is chat-rendered text: special tokens are already in it, so add none (as tokenize_request).
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    size = batch_size or len(prompts)
    results: list[Generation | None] = [None] * len(prompts)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), size):
            group = order[start : start + size]
            batch = tokenizer(
                [prompts[i] for i in group], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            output = model.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
            for i, tokens in zip(group, new_tokens):
                results[i] = _decode(tokenizer, tokens, stops)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [r for r in results if r is not None]


def _decode(tokenizer: PreTrainedTokenizerBase, tokens: list[int], stops: Sequence[int]) -> Generation:
    """Cut at the first stop token (what follows is padding), then decode without special tokens."""
    end = next((k for k, token in enumerate(tokens) if token in stops), None)
    kept = tokens if end is None else tokens[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return Generation(text, end is not None, len(kept), tuple(int(t) for t in kept))
