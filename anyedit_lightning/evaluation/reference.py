"""The unedited model's side of every faithfulness comparison: its weights and its greedy answers.

* :func:`weights_swapped` puts snapshot tensors (an ``EditRecord.before``) back into the model for the
  duration of a block and restores the current ones bit-exactly afterwards, even on an exception;
* :func:`reference_answers` gives the model's greedy answers (token ids) to chat-rendered prompts,
  cached on disk per weights fingerprint and answer length, with a content checksum (a corrupted or
  hand-edited cache is rebuilt with a warning).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.requests import EditRequest, end_of_turn_id, prompt_text
from ..metrics.forced import ForcedItem
from ..models.fingerprint import weights_fingerprint
from ..storage.integrity import read_json_verified, write_json_with_checksum
from ..storage.paths import cache_dir
from .generation import generate_batch

log = logging.getLogger(__name__)

REFERENCE_TOKENS = 40


@dataclass(frozen=True)
class ReferenceAnswer:
    """The unedited greedy answer: its ids (stop token excluded) and whether it ended by itself."""

    prompt: str
    token_ids: tuple[int, ...]
    stopped: bool


def render(tokenizer, prompt: str) -> str:
    return prompt_text(tokenizer, EditRequest(prompt, "-"))


def template_prefix(tokenizer) -> tuple[int, ...]:
    """The ids that rendered prompts start with: the chat template's text before the user's prompt."""
    a, b = (tokenizer(render(tokenizer, text), add_special_tokens=False)["input_ids"] for text in "AB")
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return tuple(a[:n])


def _key(rendered: str) -> str:
    return hashlib.sha256(rendered.encode()).hexdigest()[:24]


def answers_cache_path(fingerprint: str, max_new_tokens: int) -> Path:
    return cache_dir("locality", fingerprint[:20]) / f"answers-{max_new_tokens}.json"


def reference_answers(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = REFERENCE_TOKENS,
    batch_size: int = 16,
    use_cache: bool = True,
) -> list[ReferenceAnswer]:
    """The model's greedy answers to the user ``prompts`` as they are now; only uncached ones are generated."""
    fingerprint = weights_fingerprint(model)
    path = answers_cache_path(fingerprint, max_new_tokens)
    cached: dict = {}
    if use_cache:
        payload = read_json_verified(path)
        if isinstance(payload, dict) and payload.get("fingerprint") == fingerprint:
            cached = dict(payload.get("answers") or {})
    rendered = [render(tokenizer, p) for p in prompts]
    missing = list(dict.fromkeys(r for r in rendered if _key(r) not in cached))
    if missing:
        log.info("Generating %d unedited reference answer(s) (%d tokens)", len(missing), max_new_tokens)
        for text, gen in zip(missing, generate_batch(model, tokenizer, missing, max_new_tokens, batch_size)):
            cached[_key(text)] = {"ids": list(gen.token_ids), "stopped": gen.stopped}
        if use_cache:
            write_json_with_checksum(
                path, {"fingerprint": fingerprint, "max_new_tokens": max_new_tokens, "answers": cached}
            )
    return [
        ReferenceAnswer(p, tuple(cached[_key(r)]["ids"]), bool(cached[_key(r)]["stopped"]))
        for p, r in zip(prompts, rendered)
    ]


def forced_items(tokenizer, answers: Sequence[ReferenceAnswer]) -> list[ForcedItem]:
    """Teacher-forcing items: the rendered prompt's ids, the answer ids plus the stop token if it stopped."""
    eot = end_of_turn_id(tokenizer)
    items = []
    for answer in answers:
        prompt_ids = tokenizer(render(tokenizer, answer.prompt), add_special_tokens=False)["input_ids"]
        tail = (int(eot),) if answer.stopped and eot is not None else ()
        items.append(ForcedItem(tuple(prompt_ids), answer.token_ids + tail))
    return items
