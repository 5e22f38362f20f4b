"""The answer step: the final short answer from the question, the sub-answers and the evidence.

Two signatures: :class:`AnswerFromFindings` for the agents that answered sub-questions (APEX, OPERA), and
:class:`AnswerFromPassages` for those that only collected documents (RAG, QAgent, and QAgent's frozen
generator). Both keep the output to one short field: the answer is what EM and F1 score.
"""

from __future__ import annotations

from collections.abc import Sequence

import dspy

from apexdsp.programs.base import clean_answer
from apexdsp.programs.evidence import format_passages, is_non_answer, strip_echo
from apexdsp.programs.trajectory import RetrievedPassage, SubGoalRecord


class AnswerFromFindings(dspy.Signature):
    """Answer the question with a short factoid from the findings and passages: a name, a date, a number,
    or yes/no."""

    question: str = dspy.InputField()
    findings: str = dspy.InputField()
    passages: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="a few words, no explanation")


class AnswerFromPassages(dspy.Signature):
    """Answer the question with a short factoid from the passages: a name, a date, a number, or yes/no."""

    question: str = dspy.InputField()
    passages: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="a few words, no explanation")


def fallback_answer(records: Sequence[SubGoalRecord]) -> str:
    """The last sub-goal's answer that says something, preferring answered ones (used when the answer
    step returns nothing)."""
    for wanted in (True, False):
        for record in reversed(records):
            if record.answered == wanted and record.answer and not is_non_answer(record.answer):
                return record.answer
    return ""


class AnswerStep(dspy.Module):
    """``(question, findings, passages) -> answer``; an empty answer falls back to the last sub-answer."""

    def __init__(self, passage_chars: int = 300, max_tokens: int = 24):
        super().__init__()
        self.passage_chars = passage_chars
        self.generate = dspy.Predict(AnswerFromFindings, max_tokens=max_tokens)

    def forward(self, question: str, findings: str, passages: Sequence[RetrievedPassage],
                records: Sequence[SubGoalRecord] = ()) -> dspy.Prediction:
        raw = self.generate(question=question, findings=findings,
                            passages=format_passages(passages, self.passage_chars)).answer
        answer = strip_echo(clean_answer(raw))
        used_fallback = is_non_answer(answer)
        if used_fallback:
            answer = fallback_answer(records)
        return dspy.Prediction(answer=answer, used_fallback=used_fallback and bool(answer))


class PassageReader(dspy.Module):
    """``(question, passages) -> answer``: RAG's reader, and the frozen generator of QAgent's plug-and-play
    setting (run under ``dspy.context(lm=frozen)``)."""

    def __init__(self, passage_chars: int = 300, max_tokens: int = 24):
        super().__init__()
        self.passage_chars = passage_chars
        self.generate = dspy.Predict(AnswerFromPassages, max_tokens=max_tokens)

    def forward(self, question: str, passages: Sequence) -> dspy.Prediction:
        raw = self.generate(question=question, passages=format_passages(passages, self.passage_chars)).answer
        return dspy.Prediction(answer=strip_echo(clean_answer(raw)))
