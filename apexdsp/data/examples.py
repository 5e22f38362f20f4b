"""Turn :class:`Question` records into ``dspy.Example`` objects, the unit DSPy evaluates and optimises on.

Only ``question`` is an input: a program must find everything else itself. The gold fields ride along
as labels, so metrics read ``example.answer`` / ``example.answers`` and retrieval metrics read
``example.supporting_titles``. The labels are plain strings, lists and dicts (not pydantic objects) so
that a program saved with labelled demos serialises to JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import dspy

from apexdsp.data.records import Question

__all__ = ["as_examples", "to_example", "to_examples"]


def to_example(question: Question) -> dspy.Example:
    """One question as a ``dspy.Example`` with input ``question`` and gold labels beside it."""
    decomposition = (
        None if question.decomposition is None else [step.model_dump() for step in question.decomposition]
    )
    return dspy.Example(
        question=question.question,
        answer=question.answer,
        answers=question.answers,
        supporting_titles=list(question.supporting_titles),
        id=question.id,
        type=question.type,
        decomposition=decomposition,
    ).with_inputs("question")


def to_examples(questions: Iterable[Question]) -> list[dspy.Example]:
    """Every question as a ``dspy.Example`` (see :func:`to_example`)."""
    return [to_example(question) for question in questions]


def as_examples(items: Sequence[dspy.Example | Question] | None) -> list[dspy.Example]:
    """DSPy examples from examples or :class:`Question` records (as :func:`to_examples` makes them)."""
    return [to_example(item) if isinstance(item, Question) else item for item in items or []]
