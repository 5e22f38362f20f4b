"""Retrieval metrics over passage titles: recall of the gold supporting titles, all-gold@k, reciprocal rank.

Multi-hop benchmarks name their evidence by Wikipedia title, and every corpus passage carries its
title, so titles are the common key between gold and retrieved. They are compared after a light
normalisation (Unicode NFC, case folding, underscores as spaces, collapsed whitespace) that absorbs
spelling differences between sources without merging distinct pages ("Tennessee" and
"Tennessee (song)" stay different).

``retrieved_titles`` is the ranked list of retrieved *passages'* titles, best first; a title may repeat
when several passages of one page are retrieved. ``k`` cuts that list (``None``: all of it). A question
without gold titles scores 0 everywhere: there is nothing to recall, and averaging callers should
leave such questions out rather than count them as perfect.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence

__all__ = ["normalize_title", "supporting_title_recall", "all_gold_at_k", "reciprocal_rank"]


def normalize_title(title: str) -> str:
    """NFC, case-folded, underscores as spaces, single spaces, stripped."""
    return " ".join(unicodedata.normalize("NFC", title).replace("_", " ").casefold().split())


def _gold_set(gold_titles: Iterable[str]) -> set[str]:
    return {form for form in map(normalize_title, gold_titles) if form}


def _top(retrieved_titles: Sequence[str], k: int | None) -> Sequence[str]:
    if k is None:
        return retrieved_titles
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return retrieved_titles[:k]


def supporting_title_recall(
    gold_titles: Iterable[str], retrieved_titles: Sequence[str], k: int | None = None
) -> float:
    """Fraction of the distinct gold titles found among the top-k retrieved titles."""
    gold = _gold_set(gold_titles)
    if not gold:
        return 0.0
    found = gold & {normalize_title(title) for title in _top(retrieved_titles, k)}
    return len(found) / len(gold)


def all_gold_at_k(gold_titles: Iterable[str], retrieved_titles: Sequence[str], k: int | None = None) -> float:
    """1.0 when every gold title is in the top-k (the whole evidence chain was retrieved), else 0.0."""
    return float(supporting_title_recall(gold_titles, retrieved_titles, k) == 1.0)


def reciprocal_rank(gold_titles: Iterable[str], retrieved_titles: Sequence[str], k: int | None = None) -> float:
    """1 / rank of the first retrieved title that is a gold title (0.0 if none is in the top-k)."""
    gold = _gold_set(gold_titles)
    for rank, title in enumerate(_top(retrieved_titles, k), start=1):
        if normalize_title(title) in gold:
            return 1.0 / rank
    return 0.0
