"""The statistics corpus: the extracted Wikipedia sample, user files and datasets, the text DataModule."""

from __future__ import annotations

import gzip
import importlib.util
import json
from itertools import islice
from pathlib import Path

import lightning as L
import pytest
from tiny import CORPUS, build_tokenizer, tiny_model

from anyedit_lightning.stats.corpus import (
    WIKIPEDIA_CHAT,
    WIKIPEDIA_SAMPLE,
    dump_articles,
    extracted_sample_path,
    resolve_corpus,
    wikipedia_chat,
    wikipedia_heldout,
    wikipedia_sample,
)
from anyedit_lightning.stats.covariance import CovarianceModule, compute_covariance
from anyedit_lightning.stats.text_data import TextCorpusDataModule

TEXTS = [line for line in CORPUS.splitlines() if line.strip()]


def test_the_checkout_ships_the_extracted_sample_with_attribution() -> None:
    path = extracted_sample_path()
    assert path is not None and path.name == "wikipedia_sample.jsonl.gz"
    first = list(islice(wikipedia_sample(), 3))
    assert len(first) == 3 and all(len(text) > 200 for text in first)
    readme = (path.parent / "README.md").read_text(encoding="utf-8")
    assert "wikipedia_sample.jsonl.gz" in readme and "CC BY-SA" in readme


@pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None, reason="the gensim wheel (source dump) is not installed"
)
def test_extracted_sample_equals_the_dump_it_was_built_from() -> None:
    from anyedit_lightning.stats.corpus import HELDOUT_ARTICLES, wikipedia_articles, wikipedia_sample_path

    extracted = list(wikipedia_articles())
    assert extracted == list(dump_articles(wikipedia_sample_path()))
    assert len(extracted) == 106
    assert list(wikipedia_sample()) == extracted[:-HELDOUT_ARTICLES]  # the rest is held out for perplexity


def test_text_and_jsonl_files_and_lists_of_them(tmp_path: Path) -> None:
    txt, jsonl, gz = tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.jsonl.gz"
    txt.write_text(TEXTS[0], encoding="utf-8")
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[1:3]) + "\n\n", encoding="utf-8")
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": TEXTS[3]}) + "\n")
    name, texts = resolve_corpus([txt, str(jsonl), gz])
    assert list(texts) == TEXTS[:4] and name.startswith("files-")
    assert resolve_corpus(str(txt))[1] == [TEXTS[0]]
    assert resolve_corpus(TEXTS)[0] != name and resolve_corpus(TEXTS)[0] == resolve_corpus(list(TEXTS))[0]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [('{"body": "x"}\n', ".jsonl", "string field 'text'"), ("x", ".csv", "use a .txt or .jsonl")],
)
def test_bad_corpus_files_are_refused_clearly(
    tmp_path: Path, content: str, suffix: str, message: str
) -> None:
    path = tmp_path / f"corpus{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        list(resolve_corpus(path)[1])


def test_unknown_names_and_non_text_items_are_refused() -> None:
    with pytest.raises(ValueError, match="not 'wikipedia-sample', 'wikipedia-chat' or a file"):
        resolve_corpus("wikipedia-full")
    with pytest.raises(TypeError, match="strings"):
        resolve_corpus(["a text", 3])


class _FakeDataset:
    """What `resolve_corpus` uses of a `datasets.Dataset`: column names, a column, a fingerprint."""

    column_names = ["id", "text"]
    _fingerprint = "abc123"

    def __getitem__(self, column: str) -> list[str]:
        assert column == "text"
        return TEXTS


def test_a_datasets_dataset_with_a_text_column() -> None:
    name, texts = resolve_corpus(_FakeDataset())
    assert name == "dataset-abc123" and texts == TEXTS


def test_datamodule_shards_batches_by_rank_without_overlap() -> None:
    tokenizer = build_tokenizer()
    data = TextCorpusDataModule(tokenizer, TEXTS * 4, max_tokens=400, seq_len=16, tokens_per_batch=48)
    assert data.corpus_name == resolve_corpus(TEXTS * 4)[0]

    class _Trainer:  # what the shard reads of the attached Trainer
        def __init__(self, rank: int):
            self.global_rank, self.world_size = rank, 2

    shards = []
    for rank in (0, 1):
        data.trainer = _Trainer(rank)
        shards.append([ids for ids, _mask in data.test_dataloader()])
    assert len(shards[0]) + len(shards[1]) == len(data.batches) >= 4
    assert [b.tolist() for b in shards[0]] == [ids.tolist() for ids, _ in data.batches[0::2]]
    assert [b.tolist() for b in shards[1]] == [ids.tolist() for ids, _ in data.batches[1::2]]


def test_statistics_run_through_trainer_test_with_the_datamodule(monkeypatch: pytest.MonkeyPatch) -> None:
    """compute_covariance hands the DataModule to ``Trainer.test``; the result equals a plain loop."""
    model, tokenizer = tiny_model("llama"), build_tokenizer()
    seen = []
    real_test = L.Trainer.test

    def spy(self, model=None, dataloaders=None, ckpt_path=None, verbose=True, datamodule=None, **kwargs):
        seen.append((type(model), type(datamodule)))
        return real_test(self, model, dataloaders, ckpt_path, verbose, datamodule, **kwargs)

    monkeypatch.setattr(L.Trainer, "test", spy)
    kwargs = dict(corpus=TEXTS * 4, max_tokens=300, seq_len=16, tokens_per_batch=64, use_cache=False)
    via_trainer = compute_covariance(model, tokenizer, [1, 2], **kwargs)
    plain = compute_covariance(model, tokenizer, [1, 2], trainer=False, **kwargs)
    assert seen == [(CovarianceModule, TextCorpusDataModule)]
    for layer in (1, 2):
        assert (via_trainer[layer] - plain[layer]).abs().max() < 1e-12
    assert WIKIPEDIA_SAMPLE == "wikipedia-sample"


def test_chat_corpus_renders_statistics_articles_as_exchanges() -> None:
    """``wikipedia-chat``: every text is one rendered user/assistant exchange whose answer comes from the
    statistics articles (never the held-out ones); deterministic, so its cache name is stable."""
    tok = build_tokenizer()
    texts = wikipedia_chat(tok)
    assert len(texts) > 500
    assert all(t.count("<|im_start|>user") == 1 and t.count("<|im_start|>assistant") == 1 for t in texts)
    answer = texts[7].split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    assert any(answer[:80] in " ".join(a.split()) for a in wikipedia_sample())
    assert not any(answer[:80] in " ".join(a.split()) for a in wikipedia_heldout())
    name, again = resolve_corpus(WIKIPEDIA_CHAT, tok)
    assert name == resolve_corpus(WIKIPEDIA_CHAT, tok)[0] and list(again) == texts
    with pytest.raises(ValueError, match="needs the tokenizer"):
        resolve_corpus(WIKIPEDIA_CHAT)
    plain = build_tokenizer(chat_template=False)
    with pytest.raises(ValueError, match="no chat template"):
        wikipedia_chat(plain)
