"""Generic English text for the second-moment statistics (docs/algorithm.md §5), available offline.

The default corpus is a shortened English Wikipedia dump (104 articles, ~600K tokens, CC BY-SA) that
the ``gensim`` wheel ships as test data. ``data/build_wikipedia_sample.py`` extracts its plain text once
into ``data/wikipedia_sample.jsonl.gz`` (attribution in ``data/README.md``); without that file (an
installed package, no checkout) the dump is read straight from the wheel, never importing gensim.
Both give the same texts, so cached statistics stay valid.

A corpus may also be a text file (``.txt``: one document; ``.jsonl``/``.jsonl.gz``: a ``text`` field
per line), a list of such paths, a ``datasets`` dataset with a ``text`` column, or any iterable of
strings.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..storage.paths import default_data_dir

WIKIPEDIA_SAMPLE = "wikipedia-sample"
WIKIPEDIA_CHAT = "wikipedia-chat"
EXTRACTED_SAMPLE = "wikipedia_sample.jsonl.gz"
_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_INSTALL_HINT = "python -m pip install --no-deps gensim"


def wikipedia_sample_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location, _DUMP)
        if path.is_file():
            return path
    raise FileNotFoundError(
        "The offline Wikipedia sample for covariance statistics comes from the gensim wheel's test data. "
        f"Install it with:\n    {_INSTALL_HINT}\n(or pass your own texts as `corpus=`)."
    )


_MARKUP = [
    (re.compile(r"<!--.*?-->", re.S), " "),
    (re.compile(r"<ref[^>]*/>|<ref.*?</ref>", re.S), " "),
    (re.compile(r"\{\|.*?\|\}", re.S), " "),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), " "),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|text]] -> text
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"<[^>]+>"), " "),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def clean_wikitext(text: str) -> str:
    """Plain prose from wiki markup: good enough for activation statistics, not for display."""
    previous = None
    while previous != text:  # templates nest
        previous, text = text, _TEMPLATE.sub(" ", text)
    for pattern, replacement in _MARKUP:
        text = pattern.sub(replacement, text)
    return text.strip()


def dump_articles(path: str | os.PathLike[str], min_chars: int = 200) -> Iterator[str]:
    """Cleaned article texts of a MediaWiki XML dump (``.bz2``), in file order (deterministic)."""
    with bz2.open(path, "rb") as handle:
        for _event, element in ET.iterparse(handle):
            if element.tag.endswith("}text") or element.tag == "text":
                text = clean_wikitext(element.text or "")
                if len(text) >= min_chars and not text.lower().startswith("#redirect"):
                    yield text
            element.clear()


def extracted_sample_path() -> Path | None:
    """``data/wikipedia_sample.jsonl.gz`` when the checkout (or ``$ANYEDIT_DATA``) has it."""
    try:
        path = default_data_dir() / EXTRACTED_SAMPLE
    except FileNotFoundError:
        return None
    return path if path.is_file() else None


HELDOUT_ARTICLES = 3
"""The sample's last articles (~170K characters, ~38K tokens) are held out of the statistics corpus, so
unrelated-text perplexity is measured on text the covariance never read. The first 100K-token
statistics never reached them, so earlier caches stay valid."""


def wikipedia_articles() -> Iterator[str]:
    """Every article of the sample: the extracted file when present, else the dump in the gensim wheel."""
    extracted = extracted_sample_path()
    if extracted is not None:
        yield from read_text_file(extracted)
    else:
        yield from dump_articles(wikipedia_sample_path())


def wikipedia_sample() -> Iterator[str]:
    """The default statistics corpus: the sample without its held-out articles (see ``wikipedia_heldout``)."""
    articles = list(wikipedia_articles())
    yield from articles[: max(0, len(articles) - HELDOUT_ARTICLES)]


_ASKS = (
    "Tell me about this: {}",
    "Can you explain the following? {}",
    "Continue this text: {}",
    "What do you know about this? {}",
)


def wikipedia_chat(tokenizer: Any, min_chars: int = 200) -> list[str]:
    """The statistics articles as chat exchanges, rendered with ``tokenizer``'s chat template.

    Edits are keyed on chat-formatted text (system prompt, user turn, assistant turn), which raw articles
    never show the model; statistics of the unedited model on such text are what the write must keep
    (docs/faithful.md). Each paragraph becomes one exchange: its first sentence, after one of a few fixed
    requests, is the user turn and the rest the assistant's answer. The texts come from
    :func:`wikipedia_sample` only, so they share nothing with the held-out perplexity text or any
    benchmark record. Deterministic.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"corpus={WIKIPEDIA_CHAT!r} renders chat turns, but this tokenizer has no chat template; "
            f"use corpus={WIKIPEDIA_SAMPLE!r}."
        )
    texts, n = [], 0
    for article in wikipedia_sample():
        for paragraph in article.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            head, _, rest = paragraph.partition(". ")
            if len(paragraph) < min_chars or not rest:
                continue
            messages = [
                {"role": "user", "content": _ASKS[n % len(_ASKS)].format(head + ".")},
                {"role": "assistant", "content": rest},
            ]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
            n += 1
    return texts


def wikipedia_heldout() -> list[str]:
    """The last ``HELDOUT_ARTICLES`` articles: plain text for perplexity, disjoint from the statistics."""
    articles = list(wikipedia_articles())
    return articles[max(0, len(articles) - HELDOUT_ARTICLES) :]


def read_text_file(path: str | os.PathLike[str]) -> Iterator[str]:
    """Documents of one file: a ``.txt`` file is one document; ``.jsonl`` (optionally ``.gz``) has a
    ``text`` field per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Corpus file {path} does not exist.")
    name = path.name.lower()
    opener: Any = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        if name.endswith((".jsonl", ".jsonl.gz")):
            for number, line in enumerate(handle, 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError(f"{path}:{number}: a corpus JSONL line needs a string field 'text'.")
                    yield record["text"]
        elif name.endswith((".txt", ".txt.gz")):
            yield handle.read()
        else:
            raise ValueError(f"Corpus file {path}: use a .txt or .jsonl file (optionally .gz).")


def _is_file(item: Any) -> bool:
    """Whether ``item`` names an existing file (a long text with newlines is never a path)."""
    if isinstance(item, str) and ("\n" in item or len(item) > 1024):
        return False
    try:
        return isinstance(item, (str, os.PathLike)) and Path(item).is_file()
    except (OSError, ValueError):
        return False


def _digest(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:12]


def resolve_corpus(corpus: Any, tokenizer: Any = None) -> tuple[str, Iterable[str]]:
    """A corpus name (part of the statistics' cache key) and its texts (``wikipedia-chat`` needs the
    tokenizer whose chat template renders it)."""
    if isinstance(corpus, str) and corpus == WIKIPEDIA_SAMPLE:
        return corpus, wikipedia_sample()
    if isinstance(corpus, str) and corpus == WIKIPEDIA_CHAT:
        if tokenizer is None:
            raise ValueError(f"corpus={WIKIPEDIA_CHAT!r} needs the tokenizer whose chat template renders it.")
        texts = wikipedia_chat(tokenizer)
        return f"{WIKIPEDIA_CHAT}-{_digest(texts)}", texts
    if isinstance(corpus, (str, os.PathLike)):
        if not _is_file(corpus):
            raise ValueError(
                f"Unknown corpus {str(corpus)!r}: not {WIKIPEDIA_SAMPLE!r}, {WIKIPEDIA_CHAT!r} or a file. Pass a .txt/.jsonl "
                "file, a list of them, a `datasets` dataset with a 'text' column, or an iterable of texts."
            )
        corpus = [corpus]
    if hasattr(corpus, "column_names"):  # a `datasets` dataset
        if "text" not in corpus.column_names:
            raise ValueError(f"The dataset has no 'text' column (columns: {corpus.column_names}).")
        texts = list(corpus["text"])
        return f"dataset-{getattr(corpus, '_fingerprint', None) or _digest(texts)}", texts
    items = list(corpus)
    if items and all(_is_file(item) for item in items):
        texts = [text for item in items for text in read_text_file(item)]
        return f"files-{_digest(texts)}", texts
    if not all(isinstance(item, str) for item in items):
        raise TypeError("A corpus iterable must hold strings (texts) or paths of existing text files.")
    return f"texts-{_digest(items)}", items
