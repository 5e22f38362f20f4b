"""The answer reward: EM or F1 of the program's own final answer (QAgent's stage-1 outcome reward).

QAgent first trains the search agent end to end on whether its own answer is right; later stages move
to the frozen-generator reward (:mod:`apexdsp.rewards.frozen_generator`), which cannot be gamed by a
planner that learns to answer rather than to search. Both EM and F1 are always reported as components;
``kind`` chooses which one is the value (EM is sparse but exact, F1 gives partial credit on long names).
"""

from __future__ import annotations

from typing import Literal

from apexdsp.data.records import Question
from apexdsp.errors import ApexError
from apexdsp.metrics import exact_match, f1
from apexdsp.programs.trajectory import Trajectory
from apexdsp.rewards.base import RewardResult, register_reward

AnswerKind = Literal["em", "f1"]


def answer_reward(question: Question, prediction_answer: str | None, kind: AnswerKind = "em") -> RewardResult:
    """EM or F1 (``kind``) of ``prediction_answer`` against the gold answer and its aliases.

    ``None`` or an empty answer scores 0; so does a gold answer that normalises to nothing.
    """
    if kind not in ("em", "f1"):
        raise ApexError(f"answer reward kind must be 'em' or 'f1', got {kind!r}")
    answer = prediction_answer if isinstance(prediction_answer, str) else ""
    components = {"em": exact_match(answer, question.answers), "f1": f1(answer, question.answers)}
    notes = [] if answer.strip() else ["no answer given"]
    return RewardResult(components[kind], components, notes)


def _answer_of(output: Trajectory | str | None) -> str | None:
    return output.answer if isinstance(output, Trajectory) else output


@register_reward("answer_em")
def answer_em_reward(question: Question, output: Trajectory | str | None) -> RewardResult:
    """Exact match of a trajectory's answer (or of an answer string)."""
    return answer_reward(question, _answer_of(output), "em")


@register_reward("answer_f1")
def answer_f1_reward(question: Question, output: Trajectory | str | None) -> RewardResult:
    """Token F1 of a trajectory's answer (or of an answer string)."""
    return answer_reward(question, _answer_of(output), "f1")


__all__ = ["answer_reward", "answer_em_reward", "answer_f1_reward"]
