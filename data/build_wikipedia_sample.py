"""Rebuild ``data/wikipedia_sample.jsonl.gz``: plain text of the English Wikipedia sample in the gensim wheel.

The default corpus for covariance statistics (docs/algorithm.md §5). The source is the shortened dump
``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(Wikipedia contributors, CC BY-SA 3.0/4.0; attribution in data/README.md). gensim is located, never
imported. The output is deterministic (gzip without a timestamp), so a rebuild gives identical bytes.

    python -m pip install --no-deps gensim
    python data/build_wikipedia_sample.py
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from anyedit_lightning.stats.corpus import EXTRACTED_SAMPLE, dump_articles, wikipedia_sample_path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / EXTRACTED_SAMPLE)
    args = parser.parse_args()
    articles = list(dump_articles(wikipedia_sample_path()))
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as handle:
        for text in articles:
            handle.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8"))
    chars = sum(map(len, articles))
    print(f"{len(articles)} articles, {chars:,} characters -> {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
