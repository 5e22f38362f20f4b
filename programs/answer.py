"""The answer step: the final short answer from the question, the sub-answers and the evidence.

Two signatures: :class:`AnswerFromFindings` for the agents that answered sub-questions (APEX, OPERA), and
:class:`AnswerFromPassages` for those that only collected documents (RAG, QAgent, and QAgent's frozen
generator). Both keep the output to one short field: the answer is what EM and F1 score.

A yes/no question (one that opens with an auxiliary verb and offers no "or" choice: 22 of the 300
HotpotQA dev questions, with no false positive) goes to a second predictor whose answer is typed
``Literal["yes", "no"]``. Asked with the open signature, SmolLM2-135M answers such a question with a
sentence, which exact match never credits; the typed field makes DSPy's adapter state the two choices.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

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


class DecideFromFindings(dspy.Signature):
    """Answer the yes/no question from the findings and passages."""

    question: str = dspy.InputField()
    findings: str = dspy.InputField()
    passages: str = dspy.InputField()
    answer: Literal["yes", "no"] = dspy.OutputField()


class DecideFromPassages(dspy.Signature):
    """Answer the yes/no question from the passages."""

    question: str = dspy.InputField()
    passages: str = dspy.InputField()
    answer: Literal["yes", "no"] = dspy.OutputField()


_AUXILIARIES = frozenset("is are was were do does did can could has have had will would should shall may might "
                         "must".split())


def is_yes_no_question(question: str) -> bool:
    """Whether ``question`` asks for yes or no: it opens with an auxiliary verb ("Were Scott Derrickson and
    Ed Wood of the same nationality?") and offers no "or" choice ("Is X or Y older?" names its answer)."""
    words = re.findall(r"[a-z]+", question.lower())
    return bool(words) and words[0] in _AUXILIARIES and "or" not in words


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
        self.decide = dspy.Predict(DecideFromFindings, max_tokens=8)

    def forward(self, question: str, findings: str, passages: Sequence[RetrievedPassage],
                records: Sequence[SubGoalRecord] = ()) -> dspy.Prediction:
        predictor = self.decide if is_yes_no_question(question) else self.generate
        raw = predictor(question=question, findings=findings,
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
        self.decide = dspy.Predict(DecideFromPassages, max_tokens=8)

    def forward(self, question: str, passages: Sequence) -> dspy.Prediction:
        predictor = self.decide if is_yes_no_question(question) else self.generate
        raw = predictor(question=question, passages=format_passages(passages, self.passage_chars)).answer
        return dspy.Prediction(answer=strip_echo(clean_answer(raw)))
