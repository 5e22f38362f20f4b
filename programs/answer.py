"""The answer step: the final short answer from the question, the sub-answers and the evidence.

Two signatures: :class:`AnswerFromFindings` for the agents that answered sub-questions (APEX, OPERA), and
:class:`AnswerFromPassages` for those that only collected documents (RAG, QAgent, and QAgent's frozen
generator). Both keep the output to one short field: the answer is what EM and F1 score.

Two closed forms get a typed predictor instead (:mod:`.question_forms` tells them apart). A yes/no
question (22 of the 300 HotpotQA dev questions) goes to ``decide``, whose answer is typed
``Literal["yes", "no"]``; asked with the open signature, SmolLM2-135M answers such a question with a
sentence, which exact match never credits. An "X or Y" comparison (42 of the 300) goes to ``choose``,
which reads the two options as ``A)`` and ``B)`` and answers ``Literal["A", "B"]``; the answer is then the
chosen option's own words, so it can match exactly, where the open predictor wrote both names or a
passage line. With a local LM each typed answer is one constrained token (:mod:`apexdsp.lm.adapter`), and
both typed predictors carry offsets that compiling calibrates (:mod:`.choice`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import dspy

from apexdsp.programs.base import clean_answer
from apexdsp.programs.choice import ChoicePredict
from apexdsp.programs.evidence import format_passages, is_non_answer, strip_echo
from apexdsp.programs.question_forms import chosen_option, choice_options, format_options, is_yes_no_question
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


class ChooseFromFindings(dspy.Signature):
    """Answer the question by choosing option A or B, using the findings and passages."""

    question: str = dspy.InputField()
    options: str = dspy.InputField()
    findings: str = dspy.InputField()
    passages: str = dspy.InputField()
    answer: Literal["A", "B"] = dspy.OutputField()


class ChooseFromPassages(dspy.Signature):
    """Answer the question by choosing option A or B, using the passages."""

    question: str = dspy.InputField()
    options: str = dspy.InputField()
    passages: str = dspy.InputField()
    answer: Literal["A", "B"] = dspy.OutputField()


def answer_by_form(question: str, *, generate: dspy.Predict, decide: dspy.Predict, choose: dspy.Predict,
                   **inputs: str) -> str:
    """The raw answer from the predictor for the question's form: ``choose`` for "X or Y" (returning the
    chosen option's words), ``decide`` for yes/no, else ``generate``; ``inputs`` are the evidence fields."""
    options = choice_options(question)
    if options is not None:
        letter = choose(question=question, options=format_options(options), **inputs).answer
        return chosen_option(letter, options)
    predictor = decide if is_yes_no_question(question) else generate
    return predictor(question=question, **inputs).answer


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
        self.decide = ChoicePredict(DecideFromFindings, max_tokens=8)
        self.choose = ChoicePredict(ChooseFromFindings, max_tokens=8)

    def forward(self, question: str, findings: str, passages: Sequence[RetrievedPassage],
                records: Sequence[SubGoalRecord] = ()) -> dspy.Prediction:
        raw = answer_by_form(question, generate=self.generate, decide=self.decide, choose=self.choose,
                             findings=findings, passages=format_passages(passages, self.passage_chars))
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
        self.decide = ChoicePredict(DecideFromPassages, max_tokens=8)
        self.choose = ChoicePredict(ChooseFromPassages, max_tokens=8)

    def forward(self, question: str, passages: Sequence) -> dspy.Prediction:
        raw = answer_by_form(question, generate=self.generate, decide=self.decide, choose=self.choose,
                             passages=format_passages(passages, self.passage_chars))
        return dspy.Prediction(answer=strip_echo(clean_answer(raw)))
