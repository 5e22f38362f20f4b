"""Hybrid retrieval: several retrievers over one corpus, their rankings fused by reciprocal rank fusion.

ColBERT ranks the top passages best and BM25 finds more at depth (``apexdsp index eval``); fusing their
rankings keeps both. Each retriever is searched ``depth`` deep and a passage scores
``sum(weight_i / (rrf_k + rank_i))`` over the rankings it appears in (Cormack et al., 2009, who use
``rrf_k = 60``). The defaults, equal weights and ``rrf_k = 10``, were chosen on the encoder's held-out
questions of the three data sets (``benchmarks/hybrid_weights.py``; docs/notes/retrieval.md). The fused
retriever has the same ``search`` / ``search_batch`` interface as each part.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from apexdsp.errors import ApexError
from apexdsp.indexes.base import Retriever, SearchHit
from apexdsp.indexes.retriever_base import check_k, check_queries


def fuse_rankings(rankings: Sequence[list[SearchHit]], weights: Sequence[float], k: int,
                  rrf_k: int = 10) -> list[SearchHit]:
    """The top ``k`` of several rankings of one query by weighted reciprocal rank fusion."""
    scores: dict[str, float] = {}
    first: dict[str, SearchHit] = {}
    for weight, hits in zip(weights, rankings, strict=True):
        for rank, hit in enumerate(hits, start=1):
            scores[hit.pid] = scores.get(hit.pid, 0.0) + weight / (rrf_k + rank)
            first.setdefault(hit.pid, hit)
    ranked = sorted(scores, key=lambda pid: -scores[pid])[:k]  # stable: ties keep first-seen order
    return [first[pid].model_copy(update={"score": scores[pid], "rank": rank})
            for rank, pid in enumerate(ranked, start=1)]


class HybridRetriever:
    """Reciprocal rank fusion of ``retrievers`` (each weighted by ``weights``, default 1)."""

    name = "hybrid"

    def __init__(self, retrievers: Sequence[Retriever], weights: Sequence[float] | None = None, *,
                 depth: int = 50, rrf_k: int = 10):
        if len(retrievers) < 2:
            raise ApexError("a hybrid retriever fuses at least two retrievers")
        weights = list(weights) if weights is not None else [1.0] * len(retrievers)
        if len(weights) != len(retrievers) or any(w < 0 for w in weights) or not any(weights):
            raise ApexError(f"hybrid weights must be one non-negative number per retriever, got {weights}")
        self.retrievers = list(retrievers)
        self.weights = weights
        self.depth = depth
        self.rrf_k = rrf_k

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        return self.search_batch([query], k=k)[0]

    def search_batch(self, queries: list[str], k: int = 5) -> list[list[SearchHit]]:
        if isinstance(queries, str):
            raise ApexError("search_batch takes a list of queries; use search() for one")
        queries = check_queries(list(queries))
        k = check_k(k)
        depth = max(k, self.depth)
        rankings = [retriever.search_batch(queries, k=depth) for retriever in self.retrievers]
        return [fuse_rankings([ranking[i] for ranking in rankings], self.weights, k, self.rrf_k)
                for i in range(len(queries))]

    def __call__(self, query, k: int = 5):
        return self.search(query, k=k) if isinstance(query, str) else self.search_batch(list(query), k=k)


SEARCHERS = ("colbert", "bm25", "dense", "hybrid")
DEFAULT_SEARCHER = "hybrid"  # best recall of the four on every data set measured (docs/notes/retrieval.md)


def open_retriever(index_dir: str | Path, kind: str = DEFAULT_SEARCHER) -> Retriever:
    """The searcher ``kind`` over an index directory's passages: the ColBERT index itself, BM25 or dense
    MiniLM over the same passages, or ColBERT and BM25 fused (``hybrid``).

    BM25 reads the passage table kept inside the index, so it needs nothing but the index; dense MiniLM
    needs the corpus file the index was built from (its vectors are cached by the file's hash)."""
    if kind not in SEARCHERS:
        raise ApexError(f"unknown retriever {kind!r}; choose one of {', '.join(SEARCHERS)}")
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.colbert_retriever import load_retriever
    from apexdsp.indexes.manifest import IndexManifest

    manifest = IndexManifest.read(index_dir)
    if kind == "colbert":
        return load_retriever(index_dir)
    if kind == "hybrid":
        colbert = load_retriever(index_dir)
        return HybridRetriever([colbert, BM25Retriever(colbert.corpus)])
    if kind == "bm25":
        from apexdsp.indexes.corpus import read_passage_table

        return BM25Retriever(read_passage_table(Path(index_dir)))
    from apexdsp.indexes.baselines import DenseRetriever
    from apexdsp.indexes.corpus import load_corpus
    from apexdsp.paths import cache_dir

    if not Path(manifest.corpus_path).is_file():
        raise ApexError(f"corpus {manifest.corpus_path} of index {index_dir} is gone: --retriever dense needs it")
    manifest.check_corpus(index_dir, manifest.corpus_path)
    return DenseRetriever.build(load_corpus(manifest.corpus_path), cache_dir("baselines"))


__all__ = ["DEFAULT_SEARCHER", "HybridRetriever", "SEARCHERS", "fuse_rankings", "open_retriever"]
