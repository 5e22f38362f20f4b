"""Programs by name, so that the CLI, experiment specs and compiled-program state can refer to them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from apexdsp.errors import ApexError
from apexdsp.programs.base import QAProgram

ProgramFactory = Callable[..., QAProgram]


def _vanilla(retriever: Any = None, **options: Any) -> QAProgram:
    from apexdsp.programs.vanilla import Vanilla

    return Vanilla(**options)


def _rag(retriever: Any = None, **options: Any) -> QAProgram:
    from apexdsp.programs.rag import Rag

    return Rag(retriever, **options)


def _apex(retriever: Any = None, **options: Any) -> QAProgram:
    from apexdsp.programs.apex import Apex

    return Apex(retriever, **options)


def _opera(retriever: Any = None, **options: Any) -> QAProgram:
    from apexdsp.programs.opera import Opera

    return Opera(retriever, **options)


def _qagent(retriever: Any = None, **options: Any) -> QAProgram:
    from apexdsp.programs.qagent import QAgent

    return QAgent(retriever, **options)


PROGRAMS: dict[str, ProgramFactory] = {
    "vanilla": _vanilla,
    "rag": _rag,
    "apex": _apex,
    "opera": _opera,
    "qagent": _qagent,
}

RETRIEVAL_FREE = {"vanilla"}


def build_program(name: str, retriever: Any = None, **options: Any) -> QAProgram:
    """Instantiate program ``name``; programs that search need ``retriever`` (see ``indexes.base.Retriever``)."""
    try:
        factory = PROGRAMS[name]
    except KeyError:
        raise ApexError(f"unknown program {name!r}; known: {', '.join(sorted(PROGRAMS))}") from None
    if name not in RETRIEVAL_FREE and retriever is None:
        raise ApexError(f"program {name!r} searches an index: pass --index DIR")
    try:
        return factory(retriever=retriever, **options)
    except ValidationError as error:  # a misspelt or out-of-range option
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'option'}: {e['msg']}" for e in error.errors())
        raise ApexError(f"program {name!r}: bad option ({problems})") from None
