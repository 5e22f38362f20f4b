"""Closed-book baseline: the LM answers from its own weights, no retrieval."""

from __future__ import annotations

import dspy

from typing import Any

from apexdsp.programs.base import QAProgram
from apexdsp.programs.config import VanillaConfig
from apexdsp.programs.trajectory import Trajectory


class AnswerClosedBook(dspy.Signature):
    """Answer the question with a short factoid answer: a name, a date, a number, or yes/no."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="a few words, no explanation")


class Vanilla(QAProgram):
    """``question -> answer`` with one LM call."""

    name = "vanilla"

    def __init__(self, config: VanillaConfig | None = None, **options: Any):
        super().__init__()
        self.config = config or VanillaConfig(**options)
        # A short answer needs a few tokens; without a bound a small model can ramble to the LM's limit.
        self.generate_answer = dspy.Predict(AnswerClosedBook, max_tokens=self.config.max_tokens)

    def run(self, question: str, trajectory: Trajectory) -> str:
        return self.generate_answer(question=question).answer
