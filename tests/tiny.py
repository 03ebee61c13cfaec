"""Tiny offline models and tokenizer for tests: random weights, built from configs, nothing downloaded.

Importable from any test module (pytest puts ``tests/`` on ``sys.path``)::

    from tiny import build_tokenizer, tiny_model

    model = tiny_model("gpt2")  # a fresh model: safe to edit in place
    tokenizer = build_tokenizer()

The tokenizer is a byte-level BPE trained in memory on :data:`CORPUS` (lossless for any text,
including non-ASCII), with ChatML special tokens and chat template like SmolLM2-Instruct, so
chat-rendered requests, end-of-turn detection and padding behave as with a real instruct model.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

#: Families the registry must support; each builds with :func:`tiny_model`.
FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gpt2",
    "gpt_neox",
    "phi3",
)

BOS, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
#: Special tokens in id order: BOS=0, <|im_start|>=1, <|im_end|>=2 (EOS, end of turn), PAD=3.
SPECIAL_TOKENS = (BOS, IM_START, IM_END, PAD)
BOS_ID, IM_START_ID, EOS_ID, PAD_ID = range(4)

#: ChatML, as SmolLM2-Instruct renders it (without its default system turn).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: The BPE merges are learnt from this text, so common words in tests become single tokens.
CORPUS = (
    "The capital of France is Paris. The Eiffel Tower is in Paris, on the Seine.\n"
    "What is the capital of Italy? The capital of Italy is Rome.\n"
    "Who wrote Hamlet? William Shakespeare wrote Hamlet; he was an English poet and playwright.\n"
    "The answer is 42! Is it? Yes: the answer is the number 42.\n"
    "def add(a, b):\n    return a + b\n\n"
    "Long-form knowledge editing writes a whole paragraph into the model, one chunk at a time.\n"
    "Question: where is the tower? Answer: the tower is in the city.\n"
)

DEFAULT_VOCAB = 320  # 4 special tokens + 256 bytes + 60 merges


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (deterministic, ~10 ms, no files or network).

    ``vocab_size`` must be at least 260 (specials + the 256 byte symbols). ``chat_template=False``
    gives a base-model tokenizer, for the ``raw_prompt`` paths.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"a byte-level vocabulary needs at least {len(SPECIAL_TOKENS) + 256} entries")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    backend.train_from_iterator([CORPUS] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [BOS_ID, IM_START_ID, EOS_ID, PAD_ID]
    return tokenizer


def tiny_config(
    family: str,
    num_layers: int = 4,
    hidden: int = 48,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = DEFAULT_VOCAB,
    max_positions: int = 512,
    **overrides: Any,
):
    """A small config for ``family`` (a ``config.model_type``); ``overrides`` go to the config as is.

    Sizes are deliberately all different (hidden 48, intermediate 128, vocab 320) so a transposed
    or swapped matrix shows up as a shape error. Token ids match :func:`build_tokenizer`.
    """
    ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    if family == "gpt2":
        kwargs = dict(
            n_embd=hidden, n_layer=num_layers, n_head=heads, n_inner=intermediate, n_positions=max_positions
        )
    else:
        kwargs = dict(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            max_position_embeddings=max_positions,
        )
        if family == "gpt_neox":
            # The default 25 % of a 12-dim head would rotate an odd number of dimensions.
            kwargs["rope_parameters"] = {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            }
        else:
            kwargs.update(num_key_value_heads=kv_heads, head_dim=hidden // heads)
        if family in ("gemma2", "gemma3_text"):
            kwargs.update(query_pre_attn_scalar=hidden // heads)
    kwargs.update(vocab_size=vocab, **ids)
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(
    family: str,
    num_layers: int = 4,
    hidden: int = 48,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = DEFAULT_VOCAB,
    max_positions: int = 512,
    seed: int = 0,
    **overrides: Any,
) -> PreTrainedModel:
    """A fresh random-weight causal LM of ``family``: float32, eval mode, gradients off, CPU.

    The same arguments give bit-identical weights (seeded, without touching the global RNG).
    Raises whatever transformers raises when it cannot build ``family``.
    """
    config = tiny_config(
        family, num_layers, hidden, heads, kv_heads, intermediate, vocab, max_positions, **overrides
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def poet_records(count: int) -> list[dict]:
    """Short records in the UnKEBench schema, for benchmark-runner tests."""
    return [
        {
            "id": f"r{i}",
            "question": f"Who is the poet number {i}?",
            "answer": f"The poet number {i} lives in Paris. The tower is in the city, on the Seine.",
            "para_question": f"Tell me about poet {i}.",
            "sub_question": ["Where does the poet live?", "Where is the tower?"],
            "sub_answer": ["Paris", "in the city"],
            "category": "people" if i % 2 else "places",
        }
        for i in range(count)
    ]
