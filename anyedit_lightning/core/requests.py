"""Edit requests: what to write (a prompt and a target of any length), tokenized once.

docs/algorithm.md §1: the prompt is rendered through the chat template, the target is tokenized on its
own and followed by the template's end-of-turn token, and these ids are used everywhere after.
Re-tokenizing ``prompt + target`` as one string can move token boundaries (the authors' code does
that); we never do.
"""

from __future__ import annotations

import dataclasses
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
        special_tokens_as_text: a target (or chat prompt) containing one of the tokenizer's special tokens,
            e.g. ``"<|im_end|>"``, is refused by default, since it would be read as a control token;
            ``True`` encodes such strings as plain text instead. A ``raw_prompt`` keeps its markup either way.
    """

    prompt: str
    target: str
    raw_prompt: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    special_tokens_as_text: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise RequestError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not isinstance(self.target, str):
            raise RequestError(f"target must be a string, got {type(self.target).__name__}")
        if not self.prompt.strip():
            raise RequestError("prompt is empty: give the question or instruction the edit should answer")
        if not self.target.strip():
            raise RequestError("target is empty or whitespace-only: give the text the model should produce")
        for name in ("raw_prompt", "special_tokens_as_text"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"{name} must be True or False, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class TokenizedRequest:
    """``ids = prompt_ids ++ target_ids``; ``target_ids`` ends with the end-of-turn token when there is one."""

    request: EditRequest
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    content_end: int | None = None
    """Position of the last token of the user's own text in a chat prompt (None for raw prompts)."""
    content_word: int | None = None
    """Position of the user's last word token: ``content_end`` moved back over trailing punctuation."""

    @property
    def ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.target_ids

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def first_key(self, kind: str = "prompt_end") -> int:
        """Position of chunk 0's key for ``EditConfig.first_key`` ``kind``; the last prompt token when the
        prompt has no user text to move to (raw prompts)."""
        moved = {"content_end": self.content_end, "content_word": self.content_word}.get(kind)
        return self.prompt_len - 1 if moved is None else moved

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


def special_token_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The strings the tokenizer reads as single control tokens (special and special added tokens)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            tokens.add(added.content)
    return sorted((t for t in tokens if t), key=len, reverse=True)


def find_special_token(tokenizer: PreTrainedTokenizerBase, text: str) -> str | None:
    return next((token for token in special_token_strings(tokenizer) if token in text), None)


def check_special_tokens(tokenizer: PreTrainedTokenizerBase, request: EditRequest) -> None:
    """Refuse control-token strings in the target or chat prompt unless ``special_tokens_as_text``.

    Without this, a target ``"<|im_end|>"`` silently teaches an empty answer and chat markup in a target
    ends up inside the answer as real turn boundaries.
    """
    if request.special_tokens_as_text:
        return
    fields = [("target", request.target)] + ([] if request.raw_prompt else [("prompt", request.prompt)])
    for name, text in fields:
        token = find_special_token(tokenizer, text)
        if token is not None:
            raise RequestError(
                f"The {name} of request {request.prompt[:40]!r} contains {token!r}, a special token of this "
                "tokenizer: it would be read as a control token, not as text. Remove it, or pass "
                "EditRequest(..., special_tokens_as_text=True) to encode it as plain text."
            )


def _encode(
    tokenizer: PreTrainedTokenizerBase, text: str, as_text: bool, add_special: bool = False
) -> list[int]:
    options = {"split_special_tokens": True} if as_text else {}
    return list(tokenizer(text, add_special_tokens=add_special, **options)["input_ids"])


def prompt_ids(tokenizer: PreTrainedTokenizerBase, request: EditRequest) -> list[int]:
    """The ids the model sees before its answer; a chat prompt's own special-token strings stay plain
    text with ``special_tokens_as_text`` while the template's markup stays control tokens."""
    check_special_tokens(tokenizer, request)
    if request.raw_prompt:
        return _encode(tokenizer, request.prompt, False, add_special=True)
    as_text = request.special_tokens_as_text and find_special_token(tokenizer, request.prompt) is not None
    if not as_text:
        return _encode(tokenizer, render_prompt(tokenizer, request.prompt), False)
    sentinel = "ANYEDIT_PROMPT_SENTINEL"
    before, after = render_prompt(tokenizer, sentinel).split(sentinel, 1)
    return (
        _encode(tokenizer, before, False)
        + _encode(tokenizer, request.prompt, True)
        + _encode(tokenizer, after, False)
    )


def tokenize_request(tokenizer: PreTrainedTokenizerBase, request: EditRequest) -> TokenizedRequest:
    """Tokenize prompt and target separately, once (docs/algorithm.md §1)."""
    prompt_ids_ = prompt_ids(tokenizer, request)
    target_ids = _encode(tokenizer, request.target, request.special_tokens_as_text)
    eot = end_of_turn_id(tokenizer, chat=not request.raw_prompt)
    if eot is not None:
        target_ids = target_ids + [eot]
    if not prompt_ids_:
        raise RequestError(f"prompt {request.prompt[:40]!r} tokenizes to nothing")
    content_end = None if request.raw_prompt else _content_end(tokenizer, prompt_ids_)
    return TokenizedRequest(
        request,
        tuple(int(i) for i in prompt_ids_),
        tuple(int(i) for i in target_ids),
        content_end,
        None if content_end is None else _last_word(tokenizer, prompt_ids_, content_end),
    )


def _content_end(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> int | None:
    """The last position before the template's closing markup (``<|im_end|>…assistant\n``), found by
    rendering a sentinel; None when the ids do not end with that markup."""
    sentinel = "ANYEDIT_PROMPT_SENTINEL"
    after = _encode(tokenizer, render_prompt(tokenizer, sentinel).split(sentinel, 1)[1], False)
    end = len(ids) - len(after) - 1
    return end if end >= 0 and list(ids[end + 1 :]) == after else None


def _last_word(tokenizer: PreTrainedTokenizerBase, ids: list[int], end: int, look_back: int = 4) -> int:
    """``end`` moved back over up to ``look_back`` tokens without a letter or digit ("?", ".", "!)").

    Questions end in "?", whose key is nearly the same in every question; the last word's key carries
    the subject (docs/faithful.md)."""
    position = end
    while position > 0 and end - position < look_back:
        if any(ch.isalnum() for ch in tokenizer.decode([ids[position]])):
            return position
        position -= 1
    return end


def prompt_text(tokenizer: PreTrainedTokenizerBase, request: EditRequest) -> str:
    """The exact text the model sees before its answer (for generation)."""
    if request.raw_prompt:
        return request.prompt
    if not request.special_tokens_as_text:
        check_special_tokens(tokenizer, dataclasses.replace(request, target="-"))
    elif find_special_token(tokenizer, request.prompt) is not None:
        raise RequestError(
            f"Prompt {request.prompt[:40]!r} holds special-token strings meant as plain text; as one string they "
            "would be read as control tokens. Generate from prompt_ids(tokenizer, request) instead."
        )
    return render_prompt(tokenizer, request.prompt)
