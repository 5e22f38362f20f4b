"""apexdsp.indexes: ColBERT retrieval (trained encoder, PLAID index on CPU) and its BM25 / dense baselines.

Public entry points (imported lazily: importing this package does not import torch or colbert):

* :func:`load_retriever` - the shared ColBERT retriever of an index directory (``retriever(query, k)``)
* :func:`open_retriever` - any searcher over an index directory's corpus: ``colbert``, ``bm25``, ``dense``,
  or ``hybrid`` (ColBERT and BM25 fused by rank, :class:`~apexdsp.indexes.hybrid.HybridRetriever`)
* :func:`build_index` - ``apexdsp index build``
* :func:`train_encoder` - ``apexdsp index train-encoder``
* :func:`evaluate_retrieval` - ``apexdsp index eval``
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apexdsp.indexes.base import Retriever, SearchHit

if TYPE_CHECKING:
    from apexdsp.indexes.colbert_index import build_index
    from apexdsp.indexes.colbert_retriever import ColBERTRetriever, load_retriever
    from apexdsp.indexes.encoder_job import train_encoder
    from apexdsp.indexes.hybrid import HybridRetriever, open_retriever
    from apexdsp.indexes.evaluation import evaluate_retrieval

_LAZY = {
    "load_retriever": "apexdsp.indexes.colbert_retriever",
    "open_retriever": "apexdsp.indexes.hybrid",
    "HybridRetriever": "apexdsp.indexes.hybrid",
    "ColBERTRetriever": "apexdsp.indexes.colbert_retriever",
    "build_index": "apexdsp.indexes.colbert_index",
    "train_encoder": "apexdsp.indexes.encoder_job",
    "evaluate_retrieval": "apexdsp.indexes.evaluation",
}

__all__ = ["Retriever", "SearchHit", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'apexdsp.indexes' has no attribute {name!r}")
