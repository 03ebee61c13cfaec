"""Issue 20: bad settings, corrupt caches and odd targets never give a silently wrong model.

Property-based tests (hypothesis, few examples) show that any invalid ``EditConfig`` field or writer
setting raises the library's error before a weight is touched; the other tests cover one reported case
each (corrupt caches, special tokens, interrupts, unclear messages).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import logging
import math
import signal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from tiny import EOS_ID, IM_START_ID, build_tokenizer, poet_records, tiny_model

import anyedit_lightning.evaluation.scoring as scoring_module
from anyedit_lightning import (
    EditConfig,
    EditConfigError,
    EditPatch,
    EditRequest,
    ModelLoadError,
    PatchFileError,
    RequestError,
    WeightWriter,
    WriterConfigError,
    edit,
    load_model,
    make_writer,
)
from anyedit_lightning.cli import main as cli_main
from anyedit_lightning.core.requests import prompt_ids, prompt_text, render_prompt, tokenize_request
from anyedit_lightning.evaluation.runner import BenchConfig, run_benchmark
from anyedit_lightning.models import loading as models_module
from anyedit_lightning.stats.covariance import compute_covariance
from anyedit_lightning.storage.integrity import read_json_verified, write_json_with_checksum
from anyedit_lightning.storage.paths import CACHE_ENV
from anyedit_lightning.writers import AlphaEditWrite, MemitWrite, UnkeWrite

LAYERS = [1, 2]
TRAINER = dict(enable_progress_bar=False, logger=False)
REQUEST = EditRequest("What is Zorbl?", "Zorbl is a purple river.")
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CORPUS = ["The capital of France is Paris. The tower is in the city, on the Seine. " * 20]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model():
    """One tiny Llama for every refusal test: none of them may change it (each checks that)."""
    return tiny_model("llama")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[name], value) for name, value in model.state_dict().items())


# ---- strategies of invalid values -------------------------------------------------------------------

NON_NUMBERS = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.lists(st.integers(), max_size=2))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def bad_positive_real():
    return st.one_of(NON_NUMBERS, NON_FINITE, st.floats(max_value=0.0), st.integers(max_value=0))


def bad_non_negative_real():
    return st.one_of(NON_NUMBERS, NON_FINITE, st.floats(max_value=-1e-300), st.integers(max_value=-1))


def bad_int(minimum: int):
    return st.one_of(
        NON_NUMBERS,
        NON_FINITE,
        st.integers(max_value=minimum - 1),
        st.floats(allow_nan=False).map(lambda x: x + 0.5),
    )


BAD_BOOL = st.one_of(st.none(), st.integers(), st.text(max_size=3), st.floats())
BAD_CONFIG = st.one_of(
    st.tuples(st.just("v_lr"), bad_positive_real()),
    st.tuples(st.just("clamp"), bad_positive_real()),
    st.tuples(st.just("v_weight_decay"), bad_non_negative_real()),
    st.tuples(st.just("early_stop"), bad_non_negative_real()),
    st.tuples(st.just("v_steps"), bad_int(1)),
    st.tuples(st.just("window"), bad_int(1)),
    st.tuples(st.just("overlap"), st.one_of(bad_int(0), st.integers(min_value=16))),
    st.tuples(st.just("loss_layer"), st.one_of(st.integers(max_value=-1), st.floats(), st.text(max_size=2))),
    st.tuples(
        st.just("layers"),
        st.one_of(
            st.integers(),
            st.text(max_size=3),
            st.just([]),
            st.lists(st.one_of(st.floats(), st.text(max_size=1), st.booleans()), min_size=1, max_size=2),
        ),
    ),
    st.tuples(st.just("chunking"), st.text(max_size=8).filter(lambda s: s not in ("fixed", "semantic"))),
    st.tuples(st.sampled_from(["anyedit", "fast", "skip_lower_layers"]), BAD_BOOL),
    st.tuples(st.just("preserve_keys"), st.one_of(st.integers(), st.text(max_size=3), st.floats())),
)
BAD_WRITER = st.one_of(
    st.tuples(st.just("memit"), st.just("mom2_weight"), bad_positive_real()),
    st.tuples(st.sampled_from(["memit", "alphaedit"]), st.just("stats_tokens"), bad_int(1)),
    st.tuples(
        st.sampled_from(["memit", "alphaedit"]), st.just("solve_dtype"), st.sampled_from([torch.int64, "f64"])
    ),
    st.tuples(st.just("alphaedit"), st.sampled_from(["threshold", "l2"]), bad_positive_real()),
    st.tuples(st.just("unke"), st.just("lr"), bad_positive_real()),
    st.tuples(st.just("unke"), st.just("steps"), bad_int(1)),
    st.tuples(st.just("unke"), st.just("weight_decay"), bad_non_negative_real()),
    st.tuples(
        st.just("unke"), st.sampled_from(["preservation_count", "max_preservation_tokens"]), bad_int(1)
    ),
    st.tuples(st.just("unke"), st.just("preservation_texts"), st.sampled_from(["one text", [], [""], [3]])),
    st.tuples(st.just("unke"), st.just("preservation_weight"), bad_positive_real()),
    st.tuples(st.just("unke"), st.just("preservation_corpus"), st.sampled_from(["wiki", "", 3])),
)


@FAST
@given(BAD_CONFIG)
def test_any_invalid_config_value_is_refused_before_any_weight_is_touched(model, tok, bad):
    name, value = bad
    before = snapshot(model)
    overrides = {"layers": LAYERS, "window": 16, name: value}
    with pytest.raises(EditConfigError, match=name):
        edit(model, tok, REQUEST, method="memit", trainer_kwargs=TRAINER, **overrides)
    assert unchanged(model, before)


@FAST
@given(BAD_WRITER)
def test_any_invalid_writer_setting_is_refused_before_any_weight_is_touched(model, tok, bad):
    method, name, value = bad
    before = snapshot(model)
    with pytest.raises(WriterConfigError, match=name):
        edit(
            model,
            tok,
            REQUEST,
            method=method,
            layers=LAYERS,
            trainer_kwargs=TRAINER,
            writer_kwargs={name: value},
        )
    assert unchanged(model, before)


@FAST
@given(
    v_lr=st.floats(1e-4, 10),
    clamp=st.floats(1e-3, 100),
    v_weight_decay=st.floats(0, 1),
    early_stop=st.floats(0, 5),
    v_steps=st.integers(1, 100),
    window=st.integers(1, 64),
    loss_layer=st.one_of(st.none(), st.integers(0, 30)),
    preserve_keys=st.sampled_from([None, True, False]),
)
def test_valid_values_are_accepted(window, **values):
    """The checks are not over-broad: any value in the documented ranges builds a config."""
    EditConfig(layers=[1, 2], window=window, overlap=window - 1, **values)
    MemitWrite(mom2_weight=values["v_lr"])
    AlphaEditWrite(threshold=values["clamp"], l2=values["v_lr"])
    UnkeWrite(lr=values["v_lr"], steps=values["v_steps"], weight_decay=values["v_weight_decay"])


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(EditConfig)])
def test_every_config_field_is_checked_at_construction(name):
    """``__post_init__`` refuses a wrong-typed value in any field, naming it (a new field needs a check)."""
    with pytest.raises(EditConfigError, match=name):
        EditConfig(**{name: object()})


def test_every_config_field_has_a_docstring():
    """Each field is documented where it is declared (an attribute docstring, as litgpt's configs do)."""
    tree = ast.parse(inspect.getsource(EditConfig))
    body = tree.body[0].body
    documented = {
        node.target.id
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign)
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
        and isinstance(after.value.value, str)
    }
    assert documented == {f.name for f in dataclasses.fields(EditConfig)}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(clamp=math.nan), r"clamp=nan: must be a finite number > 0"),
        (dict(v_lr=math.nan), r"v_lr=nan: must be a finite number > 0"),
        (dict(v_lr=math.inf), r"v_lr=inf"),
        (dict(early_stop=-1), r"early_stop=-1: must be a finite number >= 0"),
        (dict(v_weight_decay=math.nan), r"v_weight_decay=nan"),
        (dict(layers=12), r"layers must be a list of ints, e.g. layers=\[12\]"),
        (dict(no_such_field=1), r"EditConfig has no field\(s\) \['no_such_field'\]"),
    ],
)
def test_reported_config_cases_have_clear_messages(model, tok, overrides, message):
    before = snapshot(model)
    with pytest.raises(EditConfigError, match=message):
        edit(model, tok, REQUEST, method="memit", trainer_kwargs=TRAINER, **{"layers": LAYERS, **overrides})
    assert unchanged(model, before)


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_zero_negative_or_nan_lambda_is_refused(model, tok, value):
    before = snapshot(model)
    with pytest.raises(WriterConfigError, match=r"mom2_weight=.*must be a finite number > 0"):
        edit(
            model,
            tok,
            REQUEST,
            method="memit",
            layers=LAYERS,
            trainer_kwargs=TRAINER,
            writer_kwargs={"mom2_weight": value},
        )
    assert unchanged(model, before)


def test_unknown_writer_setting_lists_the_settings():
    with pytest.raises(WriterConfigError, match=r"no setting\(s\) \['lambda'\].*mom2_weight"):
        make_writer("memit", **{"lambda": 1.0})


def test_setting_changed_after_construction_is_caught_before_the_write(model, tok):
    writer = MemitWrite(mom2_weight=1.0)
    writer.mom2_weight = math.nan
    before = snapshot(model)
    with pytest.raises(WriterConfigError, match="mom2_weight=nan"):
        edit(model, tok, REQUEST, layers=LAYERS, v_steps=1, writer=writer, trainer_kwargs=TRAINER)
    assert unchanged(model, before)


# ---- caches carry checksums ------------------------------------------------------------------------


def _flip_last_data_bit(path) -> None:
    """Flip the lowest mantissa bit of the last float64: header intact, value finite, content wrong."""
    data = bytearray(path.read_bytes())
    data[-8] ^= 1
    path.write_bytes(bytes(data))


def test_statistics_cache_with_flipped_bits_is_detected_and_rebuilt(tmp_path, monkeypatch, tok, caplog):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    tiny = tiny_model("llama")
    args = dict(corpus=CORPUS, max_tokens=500, trainer=False)
    good = compute_covariance(tiny, tok, [1], **args)
    (path,) = tmp_path.rglob("*layer1.safetensors")
    _flip_last_data_bit(path)
    with caplog.at_level(logging.WARNING, logger="anyedit_lightning.stats.covariance"):
        again = compute_covariance(tiny, tok, [1], **args)
    assert "checksum does not match" in caplog.text
    assert torch.equal(again[1], good[1])  # recomputed, not the corrupted matrix
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anyedit_lightning.stats.covariance"):
        third = compute_covariance(tiny, tok, [1], **args)  # the rewritten file is valid again
    assert caplog.text == "" and torch.equal(third[1], good[1])


def test_converted_model_cache_is_verified_and_rebuilt(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    conversions = []

    def fake_convert(folder):
        conversions.append(folder)
        (folder / "model.safetensors").write_bytes(b"\x00weights" * 100)
        (folder / "tokenizer_config.json").write_text("{}")

    monkeypatch.setattr(models_module, "_convert_embedded", fake_convert)
    target = models_module._materialise_embedded()
    assert models_module._materialise_embedded() == target and len(conversions) == 1  # verified, reused
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[5] ^= 0x10
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        models_module._materialise_embedded()
    assert len(conversions) == 2 and "checksum" in caplog.text
    assert weights.read_bytes() == b"\x00weights" * 100
    (target / "checksums.json").unlink()  # a copy without a manifest is not trusted either
    models_module._materialise_embedded()
    assert len(conversions) == 3


def test_json_with_checksum_round_trip_and_tamper(tmp_path, caplog):
    path = write_json_with_checksum(tmp_path / "answers.json", {"q": ["Paris", "Rome"]})
    assert read_json_verified(path) == {"q": ["Paris", "Rome"]}
    wrapper = json.loads(path.read_text())
    wrapper["data"]["q"][1] = "Milan"
    path.write_text(json.dumps(wrapper))
    with caplog.at_level(logging.WARNING):
        assert read_json_verified(path) is None
    assert "checksum" in caplog.text
    path.write_text("{not json")
    assert read_json_verified(path) is None
    assert read_json_verified(tmp_path / "missing.json") is None


# ---- special tokens in targets and prompts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "target", "field"),
    [
        ("What is Zorbl?", "<|im_end|>", "target"),
        ("What is Zorbl?", "Zorbl.<|im_start|>user\nhi", "target"),
        ("<|im_start|>user\nhi", "Zorbl is a river.", "prompt"),
    ],
)
def test_special_tokens_are_refused_by_default(model, tok, prompt, target, field):
    request = EditRequest(prompt, target)
    before = snapshot(model)
    with pytest.raises(
        RequestError, match=rf"The {field} .*'<\|im_(end|start)\|>'.*special_tokens_as_text=True"
    ):
        edit(model, tok, request, layers=LAYERS, trainer_kwargs=TRAINER)
    assert unchanged(model, before)
    if field == "prompt":
        with pytest.raises(RequestError, match="special_tokens_as_text"):
            prompt_text(tok, request)


def test_special_tokens_as_text_are_encoded_as_plain_text(tok):
    plain = tokenize_request(tok, EditRequest("Who?", "Zorbl is a river."))
    request = EditRequest("<|im_start|>user\nhi", "<|im_end|>", special_tokens_as_text=True)
    tokenized = tokenize_request(tok, request)
    assert tokenized.target_ids[-1] == EOS_ID and EOS_ID not in tokenized.target_ids[:-1]  # only the real end
    assert tok.decode(tokenized.target_ids[:-1]) == "<|im_end|>"
    # The template's markup stays control tokens; the prompt's own "<|im_start|>" is text.
    assert tokenized.prompt_ids.count(IM_START_ID) == plain.prompt_ids.count(IM_START_ID) == 2
    assert tok.decode(tokenized.prompt_ids) == render_prompt(tok, request.prompt)
    assert list(tokenized.prompt_ids) == prompt_ids(tok, request)
    with pytest.raises(RequestError, match="prompt_ids"):
        prompt_text(tok, request)  # one string cannot say which markup is text


@pytest.mark.smollm2
def test_special_tokens_on_smollm2(smollm2):
    _, tokenizer = smollm2
    with pytest.raises(RequestError, match="<|im_end|>"):
        tokenize_request(tokenizer, EditRequest("Who?", "<|im_end|>"))
    tokenized = tokenize_request(tokenizer, EditRequest("Who?", "<|im_end|>", special_tokens_as_text=True))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (
        end not in tokenized.target_ids[:-1] and tokenizer.decode(tokenized.target_ids[:-1]) == "<|im_end|>"
    )


# ---- interrupts ------------------------------------------------------------------------------------


class InterruptedWriter(WeightWriter):
    """Changes a weight, then the user presses Ctrl+C in the middle of the write."""

    name = "interrupted"

    def write(self, module):
        with torch.no_grad():
            module.handle.down_proj_weight(LAYERS[0]).add_(1.0)
        raise KeyboardInterrupt


def test_interrupt_reaches_the_caller_as_keyboard_interrupt(tok):
    model = tiny_model("llama")
    before = snapshot(model)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # not SystemExit(1): `except KeyboardInterrupt` works
        edit(
            model, tok, REQUEST, layers=LAYERS, v_steps=1, writer=InterruptedWriter(), trainer_kwargs=TRAINER
        )
    assert unchanged(model, before)
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl+C works again afterwards


def test_interrupted_benchmark_reaches_the_caller_as_keyboard_interrupt(tmp_path, tok, monkeypatch):
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(poet_records(2)))
    model = tiny_model("llama")
    before = snapshot(model)

    def interrupted(*args, **kwargs):  # after the edit, while generating
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring_module, "generate_batch", interrupted)
    config = BenchConfig(
        model="tiny-llama",
        preset="smollm2-135m-instruct",
        method="unke",
        dataset=str(data),
        edit={"layers": [1], "v_steps": 1},
        writer={"steps": 1, "preservation_texts": CORPUS},
        out=str(tmp_path / "out"),
        similarity=False,
        progress_bar=False,
    )
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(config, model, tok)
    assert unchanged(model, before)


# ---- clear messages -------------------------------------------------------------------------------


def test_missing_model_folder_says_so():
    with pytest.raises(ModelLoadError, match=r"The folder '/no/such/folder' does not exist"):
        load_model("/no/such/folder")


def test_patch_load_of_a_folder_or_a_corrupt_file(tmp_path):
    with pytest.raises(PatchFileError, match="is a folder"):
        EditPatch.load(tmp_path)
    corrupt = tmp_path / "bad.patch.safetensors"
    corrupt.write_bytes((200).to_bytes(8, "little") + b"{not a json header" + b" " * 190)
    with pytest.raises(PatchFileError, match=str(corrupt)):
        EditPatch.load(corrupt)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign), metadata={"format": "anyedit_lightning.EditPatch/1"})
    with pytest.raises(PatchFileError, match="damaged EditPatch file"):
        EditPatch.load(foreign)  # right format tag, missing fields


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--limit", "0"], "limit=0 selects no records"), (["--start", "100000"], "has 3 record(s)")],
)
def test_bench_selecting_zero_records_is_an_error(tmp_path, capsys, args, message):
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(poet_records(3)))
    argv = [
        "bench",
        "--model",
        "/no/model/needed",
        "--preset",
        "smollm2-135m-instruct",
        "--dataset",
        str(data),
    ]
    code = cli_main(argv + ["--out", str(tmp_path / "out"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
