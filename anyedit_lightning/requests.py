"""Edit requests: what to write (a prompt and a target of any length), tokenized once.

ALGORITHM.md §1: the prompt is rendered through the chat template, the target is tokenized on its
own and followed by the template's end-of-turn token, and these ids are used everywhere after.
Re-tokenizing ``prompt + target`` as one string can move token boundaries (the authors' code does
that); we never do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase


class RequestError(ValueError):
    """An edit request is malformed; the message names the request and the problem."""


@dataclass(frozen=True)
class EditRequest:
    """One edit: after it, the model should answer ``prompt`` with ``target``.

    Attributes:
        prompt: a question or instruction. Rendered with the chat template unless ``raw_prompt``.
        target: the new answer, of any length and format (prose, code, math, a poem).
        raw_prompt: the prompt is already rendered text (for base models without a chat template).
        extra: free-form metadata carried along (e.g. paraphrases and sub-questions for evaluation).
    """

    prompt: str
    target: str
    raw_prompt: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise RequestError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not isinstance(self.target, str):
            raise RequestError(f"target must be a string, got {type(self.target).__name__}")
        if not self.prompt.strip():
            raise RequestError("prompt is empty: give the question or instruction the edit should answer")
        if not self.target.strip():
            raise RequestError("target is empty or whitespace-only: give the text the model should produce")


@dataclass(frozen=True)
class TokenizedRequest:
    """``ids = prompt_ids ++ target_ids``; ``target_ids`` ends with the end-of-turn token when there is one."""

    request: EditRequest
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.target_ids

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The chat-template rendering of one user turn plus the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError(
            "This tokenizer has no chat template, so a chat-formatted prompt cannot be rendered. "
            "Pass EditRequest(..., raw_prompt=True) with the prompt text exactly as the model should see it."
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase, chat: bool = True) -> int | None:
    """The token that closes an assistant turn (``<|im_end|>``, ``<|eot_id|>``, ...), else EOS.

    Found by rendering a conversation with a sentinel answer and reading the first special token after
    it, so no family is hard-coded.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        sentinel = "SENTINEL_ANSWER_TEXT"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
        suffix = text[text.rfind(sentinel) + len(sentinel) :]
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        for token in tokenizer(suffix, add_special_tokens=False)["input_ids"]:
            if token in special:
                return int(token)
    return tokenizer.eos_token_id


def tokenize_request(tokenizer: PreTrainedTokenizerBase, request: EditRequest) -> TokenizedRequest:
    """Tokenize prompt and target separately, once (ALGORITHM.md §1)."""
    text = request.prompt if request.raw_prompt else render_prompt(tokenizer, request.prompt)
    prompt_ids = tokenizer(text, add_special_tokens=request.raw_prompt)["input_ids"]
    target_ids = tokenizer(request.target, add_special_tokens=False)["input_ids"]
    eot = end_of_turn_id(tokenizer, chat=not request.raw_prompt)
    if eot is not None:
        target_ids = list(target_ids) + [eot]
    if not prompt_ids:
        raise RequestError(f"prompt {request.prompt[:40]!r} tokenizes to nothing")
    return TokenizedRequest(request, tuple(int(i) for i in prompt_ids), tuple(int(i) for i in target_ids))


def prompt_text(tokenizer: PreTrainedTokenizerBase, request: EditRequest) -> str:
    """The exact text the model sees before its answer (for generation)."""
    return request.prompt if request.raw_prompt else render_prompt(tokenizer, request.prompt)
