"""Robustness of the covariance cache: corrupt or foreign files are never used, writes are atomic.

Every test points ``$ANYEDIT_CACHE`` at its own temporary folder (``cache_dir`` reads it at call time).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import CORPUS, tiny_model

from anyedit_lightning.models.fingerprint import weights_fingerprint
from anyedit_lightning.stats import covariance as stats_module
from anyedit_lightning.stats.corpus import resolve_corpus
from anyedit_lightning.stats.covariance import (
    StatsMismatchError,
    _cache_path,
    _load_cached,
    _save_cached,
    compute_covariance,
)
from anyedit_lightning.storage.integrity import atomic_write_text
from anyedit_lightning.storage.paths import CACHE_ENV

LAYERS = [1, 2]
TEXTS = [CORPUS] * 5
TOKENS = 1000
M = 128  # tiny models' intermediate size


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


@pytest.fixture
def computed(monkeypatch):
    """Records the layers of every real computation (a cache hit computes nothing)."""
    calls: list[list[int]] = []
    real = stats_module.CovarianceModule

    class Spy(real):
        def __init__(self, model, layers, architecture=None):
            calls.append(sorted(layers))
            super().__init__(model, layers, architecture)

    monkeypatch.setattr(stats_module, "CovarianceModule", Spy)
    return calls


def covariance(model, tokenizer, use_cache: bool = True):
    return compute_covariance(
        model, tokenizer, LAYERS, corpus=TEXTS, max_tokens=TOKENS, use_cache=use_cache, trainer=False
    )


def cache_file(model, layer: int):
    return _cache_path(weights_fingerprint(model), resolve_corpus(TEXTS)[0], TOKENS, layer)


def assert_same(a, b):
    assert sorted(a.matrices) == sorted(b.matrices)
    for layer in a.matrices:
        assert torch.equal(a.matrices[layer], b.matrices[layer]), layer
    assert a.counts == b.counts and a.fingerprint == b.fingerprint


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


def test_cache_is_written_and_reused(tiny_llama, computed, cache_root):
    model, tok = tiny_llama
    first = covariance(model, tok)
    assert computed == [LAYERS]
    for layer in LAYERS:
        assert cache_file(model, layer).is_file()
    assert str(cache_root) in str(cache_file(model, 1))
    second = covariance(model, tok)
    assert computed == [LAYERS]  # nothing recomputed
    assert_same(first, second)


def _truncate_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(b"\x00\xffnot a safetensors file" * 50)


def _empty(path):
    path.write_bytes(b"")


def _huge_header_length(path):
    data = bytearray(path.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    path.write_bytes(bytes(data))


def _non_finite(path):
    tensors = load_file(str(path))
    tensors["C"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=_read_meta(path))  # right fingerprint, bad values


def _wrong_shape(path):
    meta = _read_meta(path)
    save_file({"C": torch.eye(M // 2, dtype=torch.float64)}, str(path), metadata=meta)


def _no_matrix(path):
    save_file({"other": torch.zeros(1)}, str(path), metadata=_read_meta(path))


def _read_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize(
    "corrupt",
    [_truncate_half, _garbage, _empty, _huge_header_length, _non_finite, _wrong_shape, _no_matrix],
    ids=lambda f: f.__name__.strip("_"),
)
def test_corrupt_cache_file_is_detected_and_recomputed(tiny_llama, computed, corrupt, caplog):
    model, tok = tiny_llama
    good = covariance(model, tok)
    path = cache_file(model, 1)
    corrupt(path)
    assert _load_cached(path, good.fingerprint, M) is None
    with caplog.at_level(logging.WARNING, logger=stats_module.__name__):
        again = covariance(model, tok)
    assert computed == [LAYERS, [1]]  # only the damaged layer
    assert "Ignoring" in caplog.text and str(path) in caplog.text
    assert_same(good, again)
    cached = _load_cached(path, good.fingerprint, M)  # rewritten, valid again
    assert cached is not None and torch.equal(cached[0], good.matrices[1])


def test_cache_file_of_another_model_is_ignored(tiny_llama, computed):
    model, tok = tiny_llama
    other = tiny_model("llama", seed=1)
    foreign = covariance(other, tok)
    for layer in LAYERS:  # put the other model's files where this model's cache would be
        target = cache_file(model, layer)
        target.write_bytes(cache_file(other, layer).read_bytes())
    mine = covariance(model, tok)
    assert computed == [LAYERS, LAYERS]  # recomputed, not loaded
    expected = covariance(model, tok, use_cache=False)
    assert_same(mine, expected)
    assert not torch.equal(mine.matrices[1], foreign.matrices[1])
    assert _read_meta(cache_file(model, 1))["fingerprint"] == weights_fingerprint(model)


def test_stray_temp_files_of_a_killed_run_are_not_loaded(tiny_llama, computed):
    model, tok = tiny_llama
    folder = cache_file(model, 1).parent
    (folder / ".tmp-killed.safetensors").write_bytes(b"half a file")
    covariance(model, tok)
    assert computed == [LAYERS]
    assert cache_file(model, 1).is_file()


# ---- atomic writes --------------------------------------------------------------------------------------
def _failing_save(exception: BaseException):
    """A ``save_file`` that gets half the bytes onto disk and then dies."""

    def save(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        raise exception

    return save


@pytest.mark.parametrize(
    "exception", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "interrupt"]
)
def test_interrupted_write_leaves_no_file(cache_root, monkeypatch, exception):
    path = cache_root / "stats" / "abc" / "texts-1-layer1.safetensors"
    path.parent.mkdir(parents=True)
    monkeypatch.setattr(stats_module, "save_file", _failing_save(exception))
    with pytest.raises(type(exception)):
        _save_cached(path, torch.eye(4, dtype=torch.float64), "abc", 7)
    assert files_in(path.parent) == []  # neither the final file nor a temporary one


def test_interrupted_write_keeps_the_previous_good_file(cache_root, monkeypatch):
    path = cache_root / "stats" / "abc" / "texts-1-layer1.safetensors"
    path.parent.mkdir(parents=True)
    _save_cached(path, torch.eye(4, dtype=torch.float64), "abc", 7)
    monkeypatch.setattr(stats_module, "save_file", _failing_save(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _save_cached(path, 2 * torch.eye(4, dtype=torch.float64), "abc", 9)
    assert files_in(path.parent) == [path.name]
    matrix, count = _load_cached(path, "abc", 4)
    assert torch.equal(matrix, torch.eye(4, dtype=torch.float64)) and count == 7


def test_failed_rename_leaves_no_temp_file(cache_root, monkeypatch):
    path = cache_root / "stats" / "abc" / "texts-1-layer1.safetensors"
    path.parent.mkdir(parents=True)

    def no_rename(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr("anyedit_lightning.storage.integrity.os.replace", no_rename)  # the shared atomic_path
    with pytest.raises(OSError, match="rename failed"):
        _save_cached(path, torch.eye(4, dtype=torch.float64), "abc", 7)
    assert files_in(path.parent) == []


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from Linux's /proc")
def test_atomic_files_get_the_umask_without_changing_it(cache_root, monkeypatch):
    """The final file's mode is ``0o666 & ~umask``, found without calling ``os.umask`` (which would
    change the mask, for a moment, for every thread of the process)."""
    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(
            "anyedit_lightning.storage.integrity.os.umask", lambda *_: pytest.fail("os.umask was called")
        )
        path = cache_root / "file.txt"
        atomic_write_text(path, "x")
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        monkeypatch.undo()
        os.umask(previous)


def test_interrupted_computation_leaves_no_cache(tiny_llama, computed, monkeypatch):
    model, tok = tiny_llama
    monkeypatch.setattr(stats_module, "save_file", _failing_save(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        covariance(model, tok)
    folder = cache_file(model, 1).parent
    assert files_in(folder) == []
    monkeypatch.setattr(stats_module, "save_file", save_file)  # a later run computes and caches normally
    covariance(model, tok)
    assert computed == [LAYERS, LAYERS]
    assert all(cache_file(model, layer).is_file() for layer in LAYERS)


# ---- statistics used with the wrong model -----------------------------------------------------------------
def test_check_model_refuses_another_model(tiny_llama):
    model, tok = tiny_llama
    stats = covariance(model, tok, use_cache=False)
    stats.check_model(model)  # its own model: fine
    other = tiny_model("llama", seed=1)
    with pytest.raises(StatsMismatchError) as info:
        stats.check_model(other)
    message = str(info.value)
    assert stats.fingerprint[:12] in message and weights_fingerprint(other)[:12] in message
    assert isinstance(info.value, ValueError)
