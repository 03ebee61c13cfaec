"""Shared fixtures: tiny random-weight models (see ``tiny.py``) and the embedded SmolLM2.

* ``tiny_tokenizer``, ``tiny_llama``, ``tiny_gpt2`` are session-scoped and shared: do not edit
  their weights in place. A test that edits calls ``tiny_model(family)`` for a fresh copy
  (``from tiny import tiny_model``, or the ``make_tiny_model`` fixture); it takes well under a second.
* ``smollm2`` loads the embedded SmolLM2-135M-Instruct once per session, from the default cache
  (the first run converts the GGUF, ~20 s); use it in tests marked ``@pytest.mark.smollm2``.

The whole session runs with the Hugging Face hub offline: an accidental hub lookup fails at once
instead of retrying for most of a minute on a machine without network.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers imports huggingface_hub

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import FAMILIES, build_tokenizer, tiny_config, tiny_model  # noqa: E402

__all__ = ["FAMILIES", "build_tokenizer", "tiny_config", "tiny_model"]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The byte-level ChatML tokenizer every tiny model uses (vocab 320, pad/eos/bos set)."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    """``(model, tokenizer)``: a 4-layer Llama, hidden 48, intermediate 128. Shared: do not edit in place."""
    return tiny_model("llama"), tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_tokenizer):
    """``(model, tokenizer)``: a 4-layer GPT-2 (``Conv1D``, transposed weights). Shared: do not edit in place."""
    return tiny_model("gpt2"), tiny_tokenizer


@pytest.fixture(scope="session")
def make_tiny_model():
    """The :func:`tiny.tiny_model` factory, for tests that need a fresh model they may edit."""
    return tiny_model


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct, float32 on CPU, loaded once.

    Shared by every test that asks for it: a test that edits it must restore the weights it changed.
    """
    from anyedit_lightning.models.loading import load_model

    return load_model()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared, loaded CPU run many times faster on one intra-op thread (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
