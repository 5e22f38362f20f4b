"""The contract every apexdsp program keeps: ``program(question=...)`` → ``answer`` + ``trajectory``.

:class:`QAProgram` is a ``dspy.Module`` whose ``forward`` never raises for a bad question or a bad LM
output: a failure becomes an empty answer with the problem written into the trajectory, so that one
question never costs an evaluation of hundreds its results. Subclasses implement :meth:`QAProgram.run`.
"""

from __future__ import annotations

import logging
import re
from typing import ClassVar

import dspy

from apexdsp.lm.adapter import record_parse_failures
from apexdsp.lm.usage import count_lm_usage
from apexdsp.programs.trajectory import LMUsage, ParseFailureRecord, Trajectory

logger = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 1000  # longer questions are truncated (and the truncation recorded)


class QAProgram(dspy.Module):
    """Base class: wraps :meth:`run` with fault isolation, usage counting and parse-failure recording."""

    name: ClassVar[str] = "program"

    def forward(self, question: str) -> dspy.Prediction:
        question = question if isinstance(question, str) else str(question or "")
        trajectory = Trajectory(program=self.name, question=question)
        with record_parse_failures() as parse_log, count_lm_usage() as usage:
            try:
                answer = self._checked_run(question, trajectory)
            except Exception as error:  # noqa: BLE001 - one question must never end an evaluation
                logger.warning("%s failed on %r: %s", self.name, question[:80], error, exc_info=True)
                trajectory.errors.append(f"{type(error).__name__}: {error}")
                answer = ""
        trajectory.parse_failures.extend(
            ParseFailureRecord(module=f.signature, missing_fields=f.missing_fields, completion=f.completion)
            for f in parse_log.failures
        )
        trajectory.usage = LMUsage(calls=usage.calls, prompt_tokens=usage.prompt_tokens,
                                   completion_tokens=usage.completion_tokens)
        trajectory.answer = answer
        return dspy.Prediction(answer=answer, trajectory=trajectory)

    def _checked_run(self, question: str, trajectory: Trajectory) -> str:
        if not question.strip():
            trajectory.errors.append("empty question")
            return ""
        if len(question) > MAX_QUESTION_CHARS:
            trajectory.errors.append(f"question truncated from {len(question)} to {MAX_QUESTION_CHARS} characters")
            question = question[:MAX_QUESTION_CHARS]
        return clean_answer(self.run(question, trajectory))

    def run(self, question: str, trajectory: Trajectory) -> str:
        """Answer ``question``, recording what was done in ``trajectory``; may raise."""
        raise NotImplementedError


# Small models wrap a short answer in a sentence ("The answer to this question is: Paris").
_PREAMBLE = re.compile(
    r"^(?:the\s+)?(?:final\s+|short\s+)?answer(?:\s+to\s+(?:this|the)\s+question(?:\s+\"[^\"]*\")?)?\s*(?:is|:)\s*:?\s*",
    re.IGNORECASE)


def clean_answer(text: str | None) -> str:
    """The short answer inside a model's reply.

    Takes the first non-empty line (or the line after one that only announces the answer, such as
    "The answer to this question is:"), drops that announcing preamble, wrapping quotes and a trailing full
    stop. It never invents text: the result is always a substring of the reply.
    """
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return ""
    line = _PREAMBLE.sub("", lines[0], count=1).strip()
    if not line and len(lines) > 1 and not lines[1].startswith("["):
        line = _PREAMBLE.sub("", lines[1], count=1).strip()
    line = line.strip("\"'`*").strip()
    return line[:-1] if line.endswith(".") and not line.endswith("..") else line
