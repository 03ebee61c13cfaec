"""Generic English text for the second-moment statistics (ALGORITHM.md §5), available offline.

The ``gensim`` wheel ships a shortened English Wikipedia dump (104 articles, ~600K tokens, CC BY-SA)
as test data; we read that file without importing gensim. Any iterable of strings works instead.
"""

from __future__ import annotations

import bz2
import importlib.util
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path

WIKIPEDIA_SAMPLE = "wikipedia-sample"
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


def wikipedia_sample(min_chars: int = 200) -> Iterator[str]:
    """Cleaned article texts from the offline dump, in file order (deterministic)."""
    with bz2.open(wikipedia_sample_path(), "rb") as handle:
        for _event, element in ET.iterparse(handle):
            if element.tag.endswith("}text") or element.tag == "text":
                text = clean_wikitext(element.text or "")
                if len(text) >= min_chars and not text.lower().startswith("#redirect"):
                    yield text
            element.clear()


def resolve_corpus(corpus: str | Iterable[str]) -> tuple[str, Iterable[str]]:
    """A corpus name (for cache keys) and its texts."""
    if isinstance(corpus, str):
        if corpus != WIKIPEDIA_SAMPLE:
            raise ValueError(f"Unknown corpus {corpus!r}; use {WIKIPEDIA_SAMPLE!r} or pass an iterable of texts.")
        return corpus, wikipedia_sample()
    texts = list(corpus)
    import hashlib

    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]
    return f"texts-{digest}", texts
