"""Pure scoring functions: answer metrics (EM, F1, Hit) and retrieval metrics over supporting titles."""

from apexdsp.metrics.answer import answer_hit, exact_match, f1, normalize_answer
from apexdsp.metrics.retrieval import all_gold_at_k, normalize_title, reciprocal_rank, supporting_title_recall

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1",
    "answer_hit",
    "normalize_title",
    "supporting_title_recall",
    "all_gold_at_k",
    "reciprocal_rank",
]
