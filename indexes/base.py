"""The retriever contract shared by every index and by the programs that search them.

A retriever is loaded once and shared by all modules of a program. It is callable with one query or a
list of queries and returns, per query, the top-k passages with ids, titles, text and scores (best first).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pydantic import BaseModel


class SearchHit(BaseModel):
    """One retrieved passage."""

    pid: str
    title: str
    text: str
    score: float
    rank: int  # 1-based


@runtime_checkable
class Retriever(Protocol):
    """What programs need from an index."""

    name: str

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        """Top-k passages for one query, best first."""
        ...

    def search_batch(self, queries: list[str], k: int = 5) -> list[list[SearchHit]]:
        """Top-k passages for each query; batched where the backend gains from it."""
        ...
