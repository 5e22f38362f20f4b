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


def optional_retriever(index: str | os.PathLike[str] | None, kind: str = "hybrid") -> Any:
    """The searcher ``kind`` over ``index`` (ColBERT itself, bm25, dense or hybrid), or ``None`` when no index
    was given (retrieval-free programs)."""
    if index is None:
        return None
    from apexdsp.indexes import open_retriever

    return open_retriever(index, kind)


def program_options(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (``--option frozen_generator=smollm2-135m``) as program options.

    A value that reads as JSON (``3``, ``true``, ``0.5``) is that value, anything else a string; the
    program's own config then validates the keys and types and names any it rejects.
    """
    import json

    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ApexError(f"--option {item!r}: expected KEY=VALUE, e.g. frozen_generator=smollm2-135m")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options
