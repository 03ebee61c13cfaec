"""Second-moment (covariance) statistics of the MLP keys and the text corpora they are computed on."""

from .corpus import WIKIPEDIA_CHAT, WIKIPEDIA_SAMPLE, resolve_corpus
from .covariance import CovarianceModule, CovarianceStats, StatsMismatchError, compute_covariance
from .text_data import TextCorpusDataModule, token_batches

__all__ = [
    "WIKIPEDIA_CHAT",
    "WIKIPEDIA_SAMPLE",
    "CovarianceModule",
    "CovarianceStats",
    "StatsMismatchError",
    "TextCorpusDataModule",
    "compute_covariance",
    "resolve_corpus",
    "token_batches",
]
