"""Programs by name, so that the CLI, experiment specs and compiled-program state can refer to them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from apexdsp.errors import ApexError
from apexdsp.programs.base import QAProgram

ProgramFactory = Callable[..., QAProgram]


def _vanilla(**_: Any) -> QAProgram:
    from apexdsp.programs.vanilla import Vanilla

    return Vanilla()


PROGRAMS: dict[str, ProgramFactory] = {
    "vanilla": _vanilla,
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
    return factory(retriever=retriever, **options)
