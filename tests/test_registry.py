"""The architecture registry resolves the modules editing touches, for every family it lists."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from tiny import FAMILIES, tiny_model
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from anyedit_lightning.models import registry
from anyedit_lightning.models.registry import (
    ARCHITECTURES,
    ArchitectureSpec,
    ModelHandle,
    UnsupportedArchitectureError,
    register_architecture,
    resolve_architecture,
)

HIDDEN, INTERMEDIATE, VOCAB, LAYERS = 48, 128, 320, 4

# Every family the registry lists (checked as well that it lists the required ones).
LISTED = sorted(set(ARCHITECTURES) | set(FAMILIES))


def _build(family: str) -> nn.Module:
    version = transformers.__version__
    if family not in CONFIG_MAPPING:
        pytest.skip(f"transformers {version} does not know model_type {family!r}")
    try:
        return tiny_model(family, num_layers=LAYERS, hidden=HIDDEN, intermediate=INTERMEDIATE, vocab=VOCAB)
    except Exception as error:  # any failure to build means "not buildable here"
        pytest.skip(
            f"transformers {version} cannot build {family!r} from a config: {type(error).__name__}: {error}"
        )


@pytest.fixture(scope="module", params=LISTED)
def family_model(request):
    """``(family, model)`` for each listed family; the model is only read, never edited."""
    family, model = request.param, _build(request.param)
    return family, model


def test_required_families_are_registered():
    missing = set(FAMILIES) - set(ARCHITECTURES)
    assert not missing, f"ARCHITECTURES lacks {sorted(missing)}"


def test_templates_resolve_to_real_modules(family_model):
    family, model = family_model
    handle = resolve_architecture(model)
    assert isinstance(handle, ModelHandle)
    assert handle.spec == ARCHITECTURES[family]
    assert isinstance(handle.layers, nn.ModuleList)
    for index in range(handle.num_layers):
        assert handle.layer(index) is handle.layers[index]
        down = handle.down_proj(index)
        assert down is model.get_submodule(handle.spec.down_proj_name(index))
        # the down-projection belongs to its own layer, not to another one
        assert any(module is down for module in handle.layer(index).modules())
        assert isinstance(handle.down_proj_weight(index), nn.Parameter)
    assert isinstance(handle.final_norm, nn.Module)
    assert isinstance(handle.lm_head, nn.Module)


def test_num_layers_matches_config(family_model):
    _, model = family_model
    handle = resolve_architecture(model)
    assert handle.num_layers == model.config.num_hidden_layers == LAYERS


def test_down_proj_weight_is_hidden_by_intermediate(family_model):
    family, model = family_model
    handle = resolve_architecture(model)
    assert handle.spec.transposed == (family == "gpt2")  # GPT-2's Conv1D stores (in, out)
    for index in range(LAYERS):
        weight = handle.weight_as_out_in(index)
        assert weight.shape == (HIDDEN, INTERMEDIATE)
        assert weight.data_ptr() == handle.down_proj_weight(index).data_ptr(), "a view, not a copy"
    assert (handle.hidden_size, handle.intermediate_size) == (HIDDEN, INTERMEDIATE)
    assert handle.hidden_size == model.config.hidden_size
    assert handle.dtype == torch.float32
    assert handle.device == torch.device("cpu")


def test_down_proj_maps_intermediate_to_hidden(family_model):
    """``down_proj(x) = W x + b`` with ``W = weight_as_out_in``: the layout MEMIT's update assumes."""
    _, model = family_model
    handle = resolve_architecture(model)
    generator = torch.Generator().manual_seed(0)
    for index in (0, LAYERS - 1):
        x = torch.randn(2, 3, INTERMEDIATE, generator=generator)
        module = handle.down_proj(index)
        y = module(x)
        assert y.shape == (2, 3, HIDDEN)
        expected = x @ handle.weight_as_out_in(index).T
        if getattr(module, "bias", None) is not None:
            expected = expected + module.bias
        torch.testing.assert_close(y, expected)


def test_final_norm_and_lm_head(family_model):
    _, model = family_model
    handle = resolve_architecture(model)
    assert handle.lm_head.weight.shape == (VOCAB, HIDDEN)
    assert handle.final_norm(torch.randn(1, 2, HIDDEN)).shape == (1, 2, HIDDEN)


def test_final_norm_and_lm_head_reproduce_the_logits(family_model):
    """The last layer's output through ``final_norm`` then ``lm_head`` gives the model's logits."""
    _, model = family_model
    handle = resolve_architecture(model)
    captured = {}

    def hook(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    ids = torch.tensor([[0, 5, 17, 42, 99, 200, 7]])
    removable = handle.layer(handle.num_layers - 1).register_forward_hook(hook)
    try:
        logits = model(ids).logits
    finally:
        removable.remove()
    rebuilt = handle.lm_head(handle.final_norm(captured["hidden"]))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 squashes the logits after the head; the ranking is unchanged
        rebuilt = torch.tanh(rebuilt / cap) * cap
    torch.testing.assert_close(rebuilt, logits)


# --- errors and overrides (on the tiny Llama) -----------------------------------------------------


class _Mystery(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="mystery")
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList(
            nn.ModuleDict({"ffn_out": nn.Linear(INTERMEDIATE, HIDDEN)}) for _ in range(3)
        )
        self.backbone.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)


_MYSTERY_SPEC = ArchitectureSpec("backbone.blocks", "backbone.blocks.{}.ffn_out", "backbone.norm", "head")


def test_unknown_architecture_says_how_to_register():
    with pytest.raises(UnsupportedArchitectureError) as caught:
        resolve_architecture(_Mystery())
    message = str(caught.value)
    assert "mystery" in message
    assert "register_architecture" in message
    assert "ArchitectureSpec" in message
    assert "llama" in message  # lists the known families
    assert isinstance(caught.value, ValueError)


def test_model_without_config_is_unsupported():
    with pytest.raises(UnsupportedArchitectureError, match="register_architecture"):
        resolve_architecture(nn.Linear(2, 2))


def test_explicit_spec_and_register_architecture(monkeypatch):
    model = _Mystery()
    handle = resolve_architecture(model, spec=_MYSTERY_SPEC)
    assert handle.num_layers == 3
    assert handle.down_proj(2) is model.backbone.blocks[2]["ffn_out"]
    assert handle.weight_as_out_in(0).shape == (HIDDEN, INTERMEDIATE)

    monkeypatch.setitem(ARCHITECTURES, "mystery", _MYSTERY_SPEC)  # restored after the test
    register_architecture("mystery", _MYSTERY_SPEC)
    assert resolve_architecture(model).spec is _MYSTERY_SPEC
    assert registry.ARCHITECTURES is ARCHITECTURES


def test_overrides_replace_one_template(tiny_llama):
    model, _ = tiny_llama
    original = ARCHITECTURES["llama"]
    handle = resolve_architecture(model, down_proj="model.layers.{}.mlp.up_proj")
    assert handle.down_proj(1) is model.model.layers[1].mlp.up_proj
    assert handle.weight_as_out_in(1).shape == (INTERMEDIATE, HIDDEN)
    assert handle.spec.layers == original.layers and handle.spec.lm_head == original.lm_head
    assert ARCHITECTURES["llama"] is original and original.down_proj == "model.layers.{}.mlp.down_proj"

    flipped = resolve_architecture(model, transposed=True)
    assert flipped.weight_as_out_in(0).shape == (INTERMEDIATE, HIDDEN)


@pytest.mark.parametrize(
    "override",
    [
        {"down_proj": "model.layers.{}.mlp.nope"},
        {"layers": "model.blocks"},
        {"final_norm": "model.final_norm"},
        {"lm_head": "head"},
    ],
    ids=lambda override: next(iter(override)),
)
def test_wrong_templates_raise_a_clear_error(tiny_llama, override):
    model, _ = tiny_llama
    with pytest.raises(UnsupportedArchitectureError) as caught:
        resolve_architecture(model, **override)
    message = str(caught.value)
    assert "do not match" in message and "LlamaForCausalLM" in message
    assert "ArchitectureSpec" in message
    assert next(iter(override.values())) in message  # the offending template is shown


@pytest.mark.parametrize("layers", ["model", "model.layers.0"])
def test_layers_must_be_a_module_list(tiny_llama, layers):
    model, _ = tiny_llama
    with pytest.raises(UnsupportedArchitectureError, match="expected a ModuleList"):
        resolve_architecture(model, layers=layers)
