"""Edit requests (docs/algorithm.md §1), chunking and key positions (§2–§3), on the tiny ChatML tokenizer."""

from __future__ import annotations

import pytest
from tiny import EOS_ID, build_tokenizer

from anyedit_lightning.core.chunking import Chunk, FixedWindow, Semantic, key_positions
from anyedit_lightning.core.config import EditConfig
from anyedit_lightning.core.planning import make_chunker, plan_requests
from anyedit_lightning.core.requests import (
    EditRequest,
    RequestError,
    end_of_turn_id,
    prompt_text,
    render_prompt,
    tokenize_request,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def base_tok():
    """A base-model tokenizer: no chat template."""
    return build_tokenizer(chat_template=False)


def spans(chunks):
    return [(c.start, c.end) for c in chunks]


# ---- requests (§1) ------------------------------------------------------------------------------


def test_chat_rendering_and_end_of_turn(tok):
    request = EditRequest("Who is Ada Quill?", "Ada Quill is a glassblower from Vormund.")
    tokenized = tokenize_request(tok, request)

    rendered = render_prompt(tok, request.prompt)
    assert rendered == "<|im_start|>user\nWho is Ada Quill?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_text(tok, request) == rendered
    # the prompt is the rendered text, tokenized on its own (no BOS added: the template has its own markers)
    assert list(tokenized.prompt_ids) == tok(rendered, add_special_tokens=False)["input_ids"]
    # the target is tokenized on its own, followed by the template's end-of-turn token (<|im_end|>)
    assert end_of_turn_id(tok) == EOS_ID == tok.convert_tokens_to_ids("<|im_end|>")
    assert list(tokenized.target_ids) == tok(request.target, add_special_tokens=False)["input_ids"] + [EOS_ID]
    assert tokenized.target_ids.count(EOS_ID) == 1
    assert tokenized.ids == tokenized.prompt_ids + tokenized.target_ids
    assert len(tokenized) == len(tokenized.ids)
    assert tokenized.prompt_len == len(tokenized.prompt_ids)


def test_prompt_and_target_are_tokenized_separately(base_tok):
    """Joint tokenization would merge "4" + "2" into the token "42"; the request keeps the boundary."""
    request = EditRequest("The answer is 4", "2.", raw_prompt=True)
    tokenized = tokenize_request(base_tok, request)
    assert list(tokenized.prompt_ids) == base_tok("The answer is 4")["input_ids"]
    assert list(tokenized.target_ids[:-1]) == base_tok("2.", add_special_tokens=False)["input_ids"]
    assert tokenized.ids == tokenized.prompt_ids + tokenized.target_ids
    joint = base_tok("The answer is 42.", add_special_tokens=False)["input_ids"]
    assert list(tokenized.ids[:-1]) != joint  # the boundary shift the authors' re-tokenization suffers from
    assert base_tok.decode(list(tokenized.ids[:-1])) == "The answer is 42."


def test_raw_prompt_on_base_tokenizer(base_tok):
    request = EditRequest("Q: who is Ada?\nA:", " A glassblower.", raw_prompt=True)
    tokenized = tokenize_request(base_tok, request)
    assert prompt_text(base_tok, request) == request.prompt
    assert list(tokenized.prompt_ids) == base_tok(request.prompt)["input_ids"]
    # no template: the target ends with EOS so the edited model also learns to stop
    assert tokenized.target_ids[-1] == base_tok.eos_token_id
    assert list(tokenized.target_ids[:-1]) == base_tok(request.target, add_special_tokens=False)["input_ids"]


def test_chat_prompt_without_template_is_a_clear_error(base_tok):
    with pytest.raises(RequestError, match="no chat template.*raw_prompt=True"):
        tokenize_request(base_tok, EditRequest("Who is Ada?", "A glassblower."))


@pytest.mark.parametrize(
    ("prompt", "target", "message"),
    [
        ("Who?", "", "target is empty"),
        ("Who?", "   \n", "target is empty"),
        ("", "An answer.", "prompt is empty"),
        (123, "An answer.", "prompt must be a string"),
        ("Who?", None, "target must be a string"),
    ],
)
def test_invalid_requests(prompt, target, message):
    with pytest.raises(RequestError, match=message):
        EditRequest(prompt, target)


# ---- fixed window (§2) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "size", "overlap", "expected"),
    [
        (10, 4, 0, [(0, 4), (4, 8), (8, 10)]),
        (12, 4, 0, [(0, 4), (4, 8), (8, 12)]),
        (10, 4, 1, [(0, 4), (3, 7), (6, 10)]),
        (6, 4, 2, [(0, 4), (2, 6)]),
        (5, 4, 3, [(0, 4), (1, 5)]),
        (10, 1, 0, [(i, i + 1) for i in range(10)]),
        (10, 10, 0, [(0, 10)]),  # w = T: one chunk
        (7, 40, 0, [(0, 7)]),  # a target shorter than one window
        (7, None, 0, [(0, 7)]),  # the single-token baselines
    ],
)
def test_fixed_window_spans(total, size, overlap, expected):
    chunks = FixedWindow(size, overlap)(list(range(total)))
    assert spans(chunks) == expected
    if size is not None and size < total:
        # s_j = (j-1)(w-o), end = min(s_j + w, T), and the last chunk reaches T
        assert [c.start for c in chunks] == [j * (size - overlap) for j in range(len(chunks))]
        assert all(c.end == min(c.start + size, total) for c in chunks)
    assert chunks[-1].end == total


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (-3, 0), (4, 4), (4, 5), (4, -1)])
def test_fixed_window_rejects_invalid_parameters(size, overlap):
    with pytest.raises(ValueError, match="window size|overlap"):
        FixedWindow(size, overlap)


# ---- semantic (§2) ------------------------------------------------------------------------------

TEXT = "The tower is tall. The city is old.\nThe river is wide."


def _boundaries(tok, pieces):
    """Token index after each piece; checks the pieces tokenize the same alone as joined."""
    ids, ends = [], []
    for piece in pieces:
        ids += tok(piece, add_special_tokens=False)["input_ids"]
        ends.append(len(ids))
    assert ids == tok("".join(pieces), add_special_tokens=False)["input_ids"]
    return ids, ends


def test_semantic_boundaries_at_sentence_and_line_ends(tok):
    # a sentence end followed by a line break ends after the break (no one-token "\n" chunk)
    ids, ends = _boundaries(tok, ["The tower is tall.", " The city is old.\n", "The river is wide."])
    assert ids == tok(TEXT, add_special_tokens=False)["input_ids"]
    assert Semantic(40).boundaries(ids, tok) == ends
    ids, ends = _boundaries(tok, ["Is it?", " Yes!", " It is;", " and:", " it rains."])
    assert Semantic(40).boundaries(ids, tok) == ends


def test_semantic_code_lines(tok):
    ids, ends = _boundaries(tok, ["def add(a, b):\n", "    return a + b\n", "x = 1"])
    assert Semantic(40).boundaries(ids, tok) == ends


def test_semantic_no_boundary_inside_a_word_or_number(tok):
    ids = tok("Version 3.14 is out.", add_special_tokens=False)["input_ids"]
    assert Semantic(40).boundaries(ids, tok) == [len(ids)]


def test_semantic_merges_short_sentences(tok):
    ids, (s1, s2, end) = _boundaries(tok, ["The tower is tall.", " The city is old.\n", "The river is wide."])
    assert spans(Semantic(len(ids))(ids, tok)) == [(0, end)]  # everything fits in one budget
    # a budget holding the first two sentences but not the third
    assert spans(Semantic(s2)(ids, tok)) == [(0, s2), (s2, end)]
    # a budget too small for any two sentences keeps them apart
    size = max(s1, s2 - s1, end - s2)
    assert size < min(s2, end - s1)
    assert spans(Semantic(size)(ids, tok)) == [(0, s1), (s1, s2), (s2, end)]


def test_semantic_splits_long_sentences(tok):
    short, long_ = "The city is old.", " The tower of the city is tall and the river is wide and old"
    ids, (s1, end) = _boundaries(tok, [short, long_])
    size = s1  # the first sentence fills one budget; the long one is cut into windows of that size
    chunks = Semantic(size)(ids, tok)
    expected = [(0, s1)] + [(s, min(s + size, end)) for s in range(s1, end, size)]
    assert spans(chunks) == expected
    assert all(len(c) <= size for c in chunks)


def test_semantic_chunks_tile_the_target(tok):
    request = EditRequest("Describe the town.", TEXT + " It has a tower; a river: and a city!\nThe end.")
    target = tokenize_request(tok, request).target_ids
    for size in (1, 3, 7, 12, 100):
        chunks = Semantic(size)(target, tok)
        assert chunks[0].start == 0 and chunks[-1].end == len(target)
        assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
        assert all(1 <= len(c) <= size for c in chunks)


def test_semantic_needs_tokenizer_and_a_positive_budget():
    with pytest.raises(ValueError, match="at least 1 token"):
        Semantic(0)
    with pytest.raises(ValueError, match="tokenizer"):
        Semantic(10)([1, 2, 3])


# ---- key positions (§3) -------------------------------------------------------------------------


def test_key_positions():
    assert key_positions(7, [Chunk(0, 4), Chunk(4, 8), Chunk(8, 9)]) == [6, 10, 14]
    assert key_positions(7, [Chunk(0, 4), Chunk(3, 7), Chunk(6, 9)]) == [6, 9, 12]  # overlap 1
    assert key_positions(5, [Chunk(0, 3)]) == [4]


@pytest.mark.parametrize(("window", "overlap"), [(8, 0), (8, 3), (1000, 0)])
def test_planned_keys_precede_their_chunks(tok, window, overlap):
    request = EditRequest(
        "Who is Ada Quill?", "Ada Quill is a glassblower from Vormund who built a tide clock."
    )
    (plan,) = plan_requests(tok, [request], EditConfig(layers=[1], window=window, overlap=overlap))
    tokenized = plan.tokenized
    assert spans(plan.chunks) == spans(FixedWindow(window, overlap)(tokenized.target_ids))
    assert plan.keys[0] == tokenized.prompt_len - 1  # c_1: the last prompt token
    for chunk, key in zip(plan.chunks, plan.keys):
        assert key == tokenized.prompt_len + chunk.start - 1  # the token right before the chunk
        assert tokenized.ids[key + 1] == tokenized.target_ids[chunk.start]
    if overlap == 0 and len(plan.chunks) > 1:  # later chunks: the previous chunk's last token
        for prev, key in zip(plan.chunks, plan.keys[1:]):
            assert key == tokenized.prompt_len + prev.end - 1


def test_chunker_choice():
    assert make_chunker(EditConfig(anyedit=False)) == FixedWindow(None)
    assert make_chunker(EditConfig(window=7, overlap=2)) == FixedWindow(7, 2)
    assert make_chunker(EditConfig(chunking="semantic", window=9)) == Semantic(9)


def test_baseline_plan_is_one_chunk_keyed_at_last_prompt_token(tok):
    request = EditRequest(
        "Who is Ada Quill?", "Ada Quill is a glassblower from Vormund who built a tide clock."
    )
    (plan,) = plan_requests(tok, [request], EditConfig(layers=[1], anyedit=False, window=4))
    assert spans(plan.chunks) == [(0, len(plan.tokenized.target_ids))]
    assert plan.keys == [plan.tokenized.prompt_len - 1]
