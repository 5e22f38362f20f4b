"""What several commands read first: a question file that must not be empty, and an optional index."""

from __future__ import annotations

import os
from typing import Any

from apexdsp.errors import ApexError


def require_questions(path: str | os.PathLike[str], limit: int | None = None) -> list[Any]:
    """The questions of ``path`` (first ``limit``); an empty file is an error naming it."""
    from apexdsp.data.loaders import read_questions

    questions = read_questions(path, limit=limit)
    if not questions:
        raise ApexError(f"{os.fspath(path)}: no questions")
    return questions


def optional_retriever(index: str | os.PathLike[str] | None) -> Any:
    """The shared retriever of ``index``, or ``None`` when no index was given (retrieval-free programs)."""
    if index is None:
        return None
    from apexdsp.indexes import load_retriever

    return load_retriever(index)
