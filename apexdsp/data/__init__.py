"""Question and passage records, their JSONL and hub loaders, and the conversion to ``dspy.Example``.

``to_example`` / ``to_examples`` live in :mod:`apexdsp.data.examples` (they import DSPy).
"""

from apexdsp.data.loaders import (
    file_sha256,
    iter_corpus,
    iter_questions,
    load_questions,
    read_corpus,
    read_questions,
)
from apexdsp.data.records import DecompositionStep, Paragraph, Passage, Question

__all__ = [
    "Question",
    "Passage",
    "Paragraph",
    "DecompositionStep",
    "read_questions",
    "iter_questions",
    "iter_corpus",
    "read_corpus",
    "load_questions",
    "file_sha256",
]
