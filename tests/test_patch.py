"""Edit patches (save, load, apply, revert, stacking, refusals), ``save_edited_model`` and sequential editing.

Every edit runs on fresh tiny models (4 layers; MEMIT on layers 1-2, 5 δ steps) with statistics from a
small in-memory corpus, so the module costs a handful of tiny edits.
"""

from __future__ import annotations

import json
from datetime import datetime
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from tiny import CORPUS, tiny_model

import anyedit_lightning
from anyedit_lightning import EditConfig, EditRequest, compute_covariance, edit
from anyedit_lightning import api as api_module
from anyedit_lightning.models.fingerprint import weights_fingerprint
from anyedit_lightning.patches import deltas as patch_deltas
from anyedit_lightning.patches import patch as patch_module
from anyedit_lightning.patches.patch import EditPatch, PatchMismatchError, save_edited_model
from anyedit_lightning.presets import get_preset
from anyedit_lightning.stats.covariance import CovarianceStats, StatsMismatchError
from anyedit_lightning.writers.memit import MemitWrite

LAYERS = [1, 2]
TEXTS = [CORPUS] * 10
QUIET = dict(enable_progress_bar=False, logger=False)
REQUESTS = [
    EditRequest("Who is Ada Quill?", "Ada Quill is a lighthouse keeper on the isle of Vorn."),
    EditRequest("What is Brask?", "Brask is a river town famous for blue glass."),
    EditRequest("Who wrote The Salt Clock?", "The Salt Clock was written by Mira Okonde."),
]
EDIT_KWARGS = dict(
    method="memit", layers=LAYERS, v_steps=5, preset="smollm2-135m-instruct", trainer_kwargs=QUIET
)


def small_stats(model, tokenizer):
    return compute_covariance(
        model, tokenizer, LAYERS, corpus=TEXTS, max_tokens=2000, use_cache=False, trainer=False
    )


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Bit-identical: ``torch.equal`` on every state_dict tensor, and the same bit patterns."""
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, value in state.items():
        assert torch.equal(value, expected[name]), name
        if value.is_floating_point():
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[value.element_size()]
            assert torch.equal(value.view(bits), expected[name].view(bits)), name


def assert_patch_equal(a: EditPatch, b: EditPatch) -> None:
    assert a.metadata() == b.metadata()
    assert list(a.deltas) == list(b.deltas)
    for name in a.deltas:
        assert a.deltas[name].dtype == b.deltas[name].dtype
        assert torch.equal(a.deltas[name], b.deltas[name])
        for direction in ("apply", "revert"):
            fa, fb = a.fixups[name][direction], b.fixups[name][direction]
            assert torch.equal(fa.index, fb.index)
            assert torch.equal(fa.source, fb.source) and fa.source.dtype == fb.source.dtype
            assert torch.equal(fa.target, fb.target)
    assert (a.ledger is None) == (b.ledger is None)
    if a.ledger is not None:
        assert (a.ledger.base, a.ledger.result) == (b.ledger.base, b.ledger.result)
        assert all(torch.equal(x, y) for x, y in zip(a.ledger.sequences, b.ledger.sequences, strict=True))
        assert sorted(a.ledger.outputs) == sorted(b.ledger.outputs)
        for layer, outputs in a.ledger.outputs.items():
            assert all(torch.equal(x, y) for x, y in zip(outputs, b.ledger.outputs[layer], strict=True))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def edited(request, tiny_tokenizer):
    """Two stacked MEMIT edits of a fresh tiny model: states before/after each, and their patches."""
    family = request.param
    model = tiny_model(family)
    stats = small_stats(model, tiny_tokenizer)
    base = clone_state(model)
    base_fp = weights_fingerprint(model)
    module1 = edit(model, tiny_tokenizer, REQUESTS[0], stats=stats, **EDIT_KWARGS)
    patch1 = EditPatch.from_module(module1)
    state1 = clone_state(model)
    module2 = edit(
        model,
        tiny_tokenizer,
        REQUESTS[1],
        stats=stats,
        writer_kwargs={"check_fingerprint": False},
        **EDIT_KWARGS,
    )
    patch2 = EditPatch.from_module(module2, base_fingerprint=patch1.result_fingerprint)
    return SimpleNamespace(
        family=family,
        base=base,
        base_fp=base_fp,
        state1=state1,
        state2=clone_state(model),
        patch1=patch1,
        patch2=patch2,
        module1=module1,
    )


def fresh(family: str) -> torch.nn.Module:
    return tiny_model(family)  # same seed: bit-identical to the base of ``edited``


# ---- metadata and files ---------------------------------------------------------------------------------
def test_patch_metadata(edited):
    patch = edited.patch1
    spec = edited.module1.handle.spec
    assert sorted(patch.deltas) == sorted(spec.down_proj_name(layer) + ".weight" for layer in LAYERS)
    assert patch.method == "memit"
    assert patch.hyperparameters["layers"] == LAYERS and patch.hyperparameters["v_steps"] == 5
    assert patch.hyperparameters["writer"]["name"] == "memit"
    assert (
        patch.hyperparameters["writer"]["mom2_weight"]
        == get_preset("smollm2-135m-instruct").writer_kwargs("memit")["mom2_weight"]
    )
    assert patch.requests == [
        {"prompt": REQUESTS[0].prompt, "target": REQUESTS[0].target, "raw_prompt": False}
    ]
    assert patch.base_fingerprint == edited.base_fp
    assert patch.result_fingerprint != patch.base_fingerprint
    assert edited.patch2.base_fingerprint == patch.result_fingerprint
    assert patch.library_version == anyedit_lightning.__version__
    assert datetime.fromisoformat(patch.timestamp).utcoffset().total_seconds() == 0
    for name, delta in patch.deltas.items():
        assert delta.dtype in (torch.float32, torch.float64) and delta.device.type == "cpu"
        exact = edited.state1[name].to(delta.dtype) - edited.base[name].to(delta.dtype)
        assert torch.equal(delta, exact)
    assert "memit" in repr(patch)


def test_between_matches_from_module(edited):
    model = fresh(edited.family)
    edited.patch1.apply(model)
    other = EditPatch.between(model, edited.base)  # only the changed tensors
    assert sorted(other.deltas) == sorted(edited.patch1.deltas)
    assert other.base_fingerprint == edited.patch1.base_fingerprint
    assert other.result_fingerprint == edited.patch1.result_fingerprint
    for name, delta in other.deltas.items():
        assert torch.equal(delta, edited.patch1.deltas[name])


def test_save_load_round_trip(edited, tmp_path):
    path = edited.patch1.save(tmp_path / "edit.patch.safetensors")
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    plain = tmp_path / "plain"
    plain.write_text("")  # a patch gets the permissions of any new file, not a temporary file's 0o600
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    loaded = EditPatch.load(path)
    assert_patch_equal(loaded, edited.patch1)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert header["format"] == patch_module.FORMAT
    assert header["method"] == "memit" and header["base_fingerprint"] == edited.base_fp
    assert json.loads(header["hyperparameters"])["layers"] == LAYERS
    assert json.loads(header["requests"])[0]["target"] == REQUESTS[0].target


def test_load_refuses_other_safetensors(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an EditPatch file"):
        EditPatch.load(path)


def test_patch_file_is_small(edited, tmp_path):
    path = edited.patch1.save(tmp_path / "p.safetensors")
    model_bytes = sum(v.numel() * v.element_size() for v in edited.base.values())
    edited_bytes = sum(edited.base[name].numel() * 4 for name in edited.patch1.deltas)
    # at most float64 deltas of the edited down-projections (float32 plus fix-ups when that is smaller),
    # plus the edit's ledger entry: its token ids and the edited layers' outputs on them
    ledger = edited.patch1.ledger
    assert ledger is not None and ledger.nbytes > 0
    assert edited.patch1.size_bytes - ledger.nbytes <= 2 * edited_bytes
    assert path.stat().st_size < edited.patch1.size_bytes + 16_000  # + the JSON header
    assert path.stat().st_size < model_bytes / 4


# ---- apply / revert -------------------------------------------------------------------------------------
def test_apply_loaded_patch_to_fresh_base_is_bit_exact(edited, tmp_path):
    patch = EditPatch.load(edited.patch1.save(tmp_path / "p.safetensors"))
    model = fresh(edited.family)
    assert_state(model, edited.base)
    patch.apply(model)
    assert_state(model, edited.state1)
    assert weights_fingerprint(model) == patch.result_fingerprint


def test_revert_restores_base_bit_exactly(edited):
    model = fresh(edited.family)
    model.load_state_dict(edited.state1)
    edited.patch1.revert(model)
    assert_state(model, edited.base)
    edited.patch1.apply(model)
    assert_state(model, edited.state1)
    edited.patch1.revert(model)
    assert_state(model, edited.base)


def test_apply_refuses_other_model_unless_forced(edited):
    other = tiny_model(edited.family, seed=1)
    before = clone_state(other)
    other_fp = weights_fingerprint(other)
    with pytest.raises(PatchMismatchError) as info:
        edited.patch1.apply(other)
    message = str(info.value)
    assert edited.base_fp[:12] in message and other_fp[:12] in message and "force=True" in message
    assert_state(other, before)  # untouched

    edited.patch1.apply(other, force=True)
    for name, value in other.state_dict().items():
        if name in edited.patch1.deltas:
            assert torch.allclose(value, before[name] + edited.patch1.deltas[name].float(), atol=1e-6)
            assert not torch.equal(value, before[name])
        else:
            assert torch.equal(value, before[name])
    edited.patch1.revert(other, force=True)
    for name, value in other.state_dict().items():
        assert torch.allclose(value, before[name], atol=1e-6)


def test_apply_twice_and_revert_unapplied_are_refused(edited):
    model = fresh(edited.family)
    with pytest.raises(PatchMismatchError, match="not applied"):
        edited.patch1.revert(model)
    edited.patch1.apply(model)
    with pytest.raises(PatchMismatchError, match="already carries"):
        edited.patch1.apply(model)
    assert_state(model, edited.state1)


def test_stacked_patches_revert_in_reverse_order_only(edited):
    p1, p2 = edited.patch1, edited.patch2
    model = fresh(edited.family)
    with pytest.raises(PatchMismatchError):
        p2.apply(model)  # p2's base is p1's result
    p1.apply(model)
    p2.apply(model)
    assert_state(model, edited.state2)
    with pytest.raises(PatchMismatchError, match="revert them first"):
        p1.revert(model)  # out of order
    assert_state(model, edited.state2)
    p2.revert(model)
    assert_state(model, edited.state1)
    p1.revert(model)
    assert_state(model, edited.base)


def test_interrupted_apply_leaves_model_untouched(edited, monkeypatch):
    model = fresh(edited.family)
    real_step, calls = patch_deltas.delta_step, []

    def flaky(current, delta, direction):
        calls.append(direction)
        if len(calls) == 2:  # after the first tensor was written
            raise KeyboardInterrupt
        return real_step(current, delta, direction)

    monkeypatch.setattr(patch_deltas, "delta_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        edited.patch1.apply(model)
    assert_state(model, edited.base)


def test_apply_refuses_wrong_architecture(edited):
    model = tiny_model(edited.family, intermediate=64)
    with pytest.raises(PatchMismatchError, match="another architecture"):
        edited.patch1.apply(model, force=True)


# ---- fix-ups: bit-exactness where float arithmetic misses ------------------------------------------------
class _One(torch.nn.Module):
    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(values.clone(), requires_grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fixups_make_apply_and_revert_bit_exact(dtype, tmp_path):
    before = torch.tensor([1.0, 1e-8, -0.0, 3.0, 0.1, 2.0], dtype=torch.float64).to(dtype)
    after = torch.tensor([1.0 + 2**-20, 1e4, 1.0, 3.0, -1e4, 1e-7], dtype=torch.float64).to(dtype)
    model = _One(before)
    with torch.no_grad():
        model.w.copy_(after)
    patch = EditPatch.between(model, {"w": before})
    # 1e-8 + (1e4 - 1e-8) - 1e4 loses 1e-8, and 1 - 1 gives +0.0 where -0.0 was: both need fix-ups
    assert len(patch.fixups["w"]["revert"]) >= 1
    loaded = EditPatch.load(patch.save(tmp_path / "p.safetensors"))
    for p in (patch, loaded):
        p.revert(model)
        assert torch.equal(model.w.view(torch.uint8), before.view(torch.uint8))
        p.apply(model)
        assert torch.equal(model.w.view(torch.uint8), after.view(torch.uint8))


def test_float32_deltas_with_many_fixups_stay_bit_exact(edited, monkeypatch, tmp_path):
    """The tiny edits are large against the weights: forced to float32, most elements need a fix-up."""
    monkeypatch.setattr(patch_deltas, "delta_dtypes", lambda dtype: (torch.float32,))
    model = fresh(edited.family)
    model.load_state_dict(edited.state1)
    patch = EditPatch.between(model, edited.base)
    assert all(d.dtype == torch.float32 for d in patch.deltas.values())
    assert patch.num_fixups > 0
    patch = EditPatch.load(patch.save(tmp_path / "p.safetensors"))
    patch.revert(model)
    assert_state(model, edited.base)
    patch.apply(model)
    assert_state(model, edited.state1)


def test_unchanged_tensors_are_left_out_of_between():
    model = _One(torch.ones(3))
    patch = EditPatch.between(model, {"w": torch.ones(3)})
    assert patch.deltas == {} and patch.base_fingerprint == patch.result_fingerprint


# ---- save_edited_model ----------------------------------------------------------------------------------
def test_save_edited_model_reloads_with_from_pretrained(edited, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = fresh(edited.family)
    edited.patch1.apply(model)
    path = save_edited_model(model, tiny_tokenizer, tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    ids = torch.tensor([tiny_tokenizer("The capital of France is Paris.")["input_ids"]])
    assert tokenizer("The capital of France is Paris.")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert weights_fingerprint(reloaded) == edited.patch1.result_fingerprint


# ---- sequential editing ---------------------------------------------------------------------------------
def test_edit_sequentially(tiny_tokenizer, monkeypatch):
    model = tiny_model("llama")
    base, base_fp = clone_state(model), weights_fingerprint(model)
    seen_fps, checks, callbacks = [], [], []
    real_compute, real_check = api_module.compute_covariance, CovarianceStats.check_model

    def compute(model_, tokenizer_, layers, **kwargs):
        seen_fps.append(weights_fingerprint(model_))
        assert list(layers) == LAYERS
        return small_stats(model_, tokenizer_)

    def check(self, model_, fingerprint=None):
        checks.append(fingerprint or weights_fingerprint(model_))
        return real_check(self, model_, fingerprint)

    monkeypatch.setattr(api_module, "compute_covariance", compute)
    monkeypatch.setattr(CovarianceStats, "check_model", check)
    patches = api_module.edit_sequentially(
        model,
        tiny_tokenizer,
        REQUESTS,
        callback=lambda i, m: callbacks.append((i, m)),
        **EDIT_KWARGS,
    )
    assert real_compute is not compute
    assert seen_fps == [base_fp]  # statistics once, of the unedited model
    assert checks == [base_fp] * 3  # every edit checks them against the unedited model (its ledger)
    assert len(patches) == 3 and all(isinstance(p, EditPatch) for p in patches)
    assert [i for i, _ in callbacks] == [0, 1, 2]
    assert [m.requests for _, m in callbacks] == [[r] for r in REQUESTS]
    assert patches[0].base_fingerprint == base_fp
    for earlier, later in zip(patches, patches[1:]):
        assert later.base_fingerprint == earlier.result_fingerprint
    assert patches[-1].result_fingerprint == weights_fingerprint(model)
    for p in reversed(patches):
        p.revert(model)
    assert_state(model, base)


def test_edit_sequentially_refuses_stats_without_the_edited_layers(tiny_tokenizer):
    model = tiny_model("llama")
    stats = compute_covariance(
        model, tiny_tokenizer, [1], corpus=TEXTS, max_tokens=500, use_cache=False, trainer=False
    )
    before = clone_state(model)
    with pytest.raises(ValueError, match=r"no matrices for edited layers \[2\]"):
        api_module.edit_sequentially(model, tiny_tokenizer, REQUESTS, stats=stats, **EDIT_KWARGS)
    assert_state(model, before)


def test_covariance_writer_fingerprint_check_flag(tiny_tokenizer):
    model = tiny_model("llama")
    stats = compute_covariance(
        model, tiny_tokenizer, LAYERS, corpus=TEXTS, max_tokens=500, use_cache=False, trainer=False
    )
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # "an earlier edit"
    module = SimpleNamespace(model=model, config=EditConfig(layers=LAYERS))
    with pytest.raises(StatsMismatchError):
        MemitWrite(stats=stats).prepare(module)
    writer = MemitWrite(stats=stats, check_fingerprint=False)
    writer.prepare(module)
    assert writer.stats is stats  # used as given, not recomputed on the edited weights
