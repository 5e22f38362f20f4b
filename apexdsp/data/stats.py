"""Summaries of a question file or a corpus file: what ``apexdsp data stats`` prints.

A file's kind is told from its first record: a corpus passage has ``text`` and neither ``question``
nor ``answer``; anything else is read as a question, so a question record that lacks its ``question``
field is reported as such rather than mistaken for a passage.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from apexdsp.data.loaders import file_sha256, iter_jsonl, read_corpus, read_questions
from apexdsp.data.records import Passage, Question
from apexdsp.errors import DataError
from apexdsp.metrics.answer import normalize_answer

__all__ = ["question_stats", "corpus_stats", "detect_kind", "file_stats"]


def _summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, median, min and max (zeros for no values), rounded for display."""
    if not values:
        return {"mean": 0.0, "median": 0.0, "min": 0, "max": 0}
    return {
        "mean": round(statistics.fmean(values), 3),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def question_stats(questions: Sequence[Question]) -> dict[str, Any]:
    """Counts, types, answer lengths (in normalised tokens, the units F1 counts), evidence per question."""
    count = len(questions)
    normal_answers = [normalize_answer(q.answer) for q in questions]
    with_decomposition = [q for q in questions if q.decomposition]
    return {
        "kind": "questions",
        "count": count,
        "types": dict(Counter(q.type or "unknown" for q in questions).most_common()),
        "levels": dict(Counter(q.level or "unknown" for q in questions).most_common()),
        "answer_tokens": _summary([len(answer.split()) for answer in normal_answers]),
        "yes_no_share": round(sum(a in ("yes", "no") for a in normal_answers) / count, 4) if count else 0.0,
        "with_aliases": sum(bool(q.answer_aliases) for q in questions),
        "supporting_titles_per_question": _summary([len(q.supporting_titles) for q in questions]),
        "paragraphs_per_question": _summary([len(q.paragraphs) for q in questions]),
        "with_decomposition": len(with_decomposition),
        "without_decomposition": count - len(with_decomposition),
        "decomposition_steps": dict(sorted(Counter(len(q.decomposition or []) for q in with_decomposition).items())),
    }


def corpus_stats(passages: Sequence[Passage]) -> dict[str, Any]:
    """Passage count, distinct titles and text length in words (whitespace tokens) and characters."""
    return {
        "kind": "corpus",
        "count": len(passages),
        "unique_titles": len({p.title for p in passages}),
        "text_words": _summary([len(p.text.split()) for p in passages]),
        "text_chars_mean": round(statistics.fmean(len(p.text) for p in passages), 1) if passages else 0.0,
    }


def detect_kind(path: str | os.PathLike[str]) -> str:
    """``"corpus"`` or ``"questions"``, from the first record of the file."""
    for _line, record in iter_jsonl(path):
        is_passage = "text" in record and "question" not in record and "answer" not in record
        return "corpus" if is_passage else "questions"
    raise DataError(f"{os.fspath(path)}: no records (the file is empty)")


def file_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Stats of a question or corpus JSONL file, with its name and SHA-256 (every record is validated)."""
    kind = detect_kind(path)
    stats = question_stats(read_questions(path)) if kind == "questions" else corpus_stats(read_corpus(path))
    return {"file": os.fspath(path), "sha256": file_sha256(path), **stats}
