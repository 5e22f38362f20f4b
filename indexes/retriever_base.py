"""What every apexdsp retriever shares: query validation, hit construction, and the callable interface.

Programs call a retriever with one query (``retriever("who...", k=5)`` -> hits) or a batch
(``retriever([...], k=5)`` -> hits per query); subclasses only implement :meth:`_search_pids`, the
backend-specific ranking of integer pids, so the three retrievers behave identically at the edges:
an empty query is an error everywhere, ``k`` must be positive, and ``k`` larger than the corpus
returns the whole corpus.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

from apexdsp.errors import ApexError
from apexdsp.indexes.base import SearchHit
from apexdsp.indexes.corpus import Corpus


def check_queries(queries: Sequence[str]) -> list[str]:
    """The queries, stripped; an :class:`ApexError` for a non-string or an empty (blank) one."""
    cleaned = []
    for position, query in enumerate(queries):
        if not isinstance(query, str):
            raise ApexError(f"query {position + 1} is {type(query).__name__}, not text")
        if not query.strip():
            raise ApexError("empty query: give the retriever some words to search for"
                            + (f" (query {position + 1} of {len(queries)})" if len(queries) > 1 else ""))
        cleaned.append(query.strip())
    return cleaned


def check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ApexError(f"k must be a positive integer, got {k!r}")
    return k


class CorpusRetriever:
    """Base class: a retriever over a :class:`Corpus` whose backend ranks integer pids."""

    name: str = "retriever"

    def __init__(self, corpus: Corpus):
        self.corpus = corpus

    def _search_pids(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        """Per query, up to ``k`` ``(pid, score)`` pairs, best first. Queries are already validated."""
        raise NotImplementedError

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        """Top-k passages for one query, best first."""
        return self.search_batch([query], k=k)[0]

    def search_batch(self, queries: list[str], k: int = 5) -> list[list[SearchHit]]:
        """Top-k passages for each query, best first (batched where the backend gains from it)."""
        if isinstance(queries, str):
            raise ApexError("search_batch takes a list of queries; use search() for one")
        cleaned = check_queries(list(queries))
        k = check_k(k)
        if not cleaned:
            return []
        return [self._hits(ranked) for ranked in self._search_pids(cleaned, min(k, len(self.corpus)))]

    @overload
    def __call__(self, query: str, k: int = 5) -> list[SearchHit]: ...
    @overload
    def __call__(self, query: list[str], k: int = 5) -> list[list[SearchHit]]: ...

    def __call__(self, query, k: int = 5):
        """``retriever(query, k)`` -> hits; ``retriever([q1, q2], k)`` -> hits per query."""
        if isinstance(query, str):
            return self.search(query, k=k)
        return self.search_batch(list(query), k=k)

    def _hits(self, ranked: list[tuple[int, float]]) -> list[SearchHit]:
        hits = []
        for rank, (pid, score) in enumerate(ranked, start=1):
            passage = self.corpus[pid]
            hits.append(SearchHit(pid=passage.id, title=passage.title, text=passage.text, score=float(score),
                                  rank=rank))
        return hits
