"""The executor (APEX executor, OPERA's Reason-Execute Module): runs a plan's sub-goals in order.

For each sub-goal: fill its ``#n`` placeholders from the trajectory memory (the answers of earlier
sub-goals), write a search query, retrieve, then an analysis-answer step says whether the passages answer
the sub-question. On *no*, a rewrite step reformulates the query and the search is retried, up to a bound.
The executor always leaves an answer behind: when no attempt is judged answered it keeps the best guess
and marks the sub-goal unanswered, so later placeholders and the final answer have something to work on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import dspy

from apexdsp.indexes.base import Retriever
from apexdsp.programs.base import clean_answer
from apexdsp.programs.evidence import (clean_query, format_passages, is_non_answer, parse_yes_no, search,
                                      strip_echo)
from apexdsp.programs.planner import PLACEHOLDER, SubGoal
from apexdsp.programs.shared import Shared
from apexdsp.programs.trajectory import SubGoalRecord, Trajectory


class WriteQuery(dspy.Signature):
    """Write a short search query that finds the answer to the question."""

    question: str = dspy.InputField()
    query: str = dspy.OutputField(desc="a few keywords")


class AnalyzeAnswer(dspy.Signature):
    """Answer the question from the passages. answered is yes only if the passages give the answer."""

    question: str = dspy.InputField()
    passages: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="a few words")
    answered: str = dspy.OutputField(desc="yes or no")
    analysis: str = dspy.OutputField(desc="one short sentence")


class RewriteQuery(dspy.Signature):
    """The search did not find the answer. Write a different short search query for the question."""

    question: str = dspy.InputField()
    failed_query: str = dspy.InputField()
    query: str = dspy.OutputField(desc="a few keywords")


def memory_of(trajectory: Trajectory) -> dict[int, SubGoalRecord]:
    """The trajectory memory: every executed sub-goal by step id (its answer fills ``#id``)."""
    return {record.step: record for record in trajectory.subgoals}


def fill_placeholders(text: str, memory: Mapping[int, SubGoalRecord]) -> tuple[str, list[int]]:
    """Replace ``#n`` by step ``n``'s answer; return the filled text and the steps that had none.

    An unfillable placeholder (step missing, or its answer empty) is replaced by that step's sub-question
    where known, so the text still carries the entity to search for, and is reported.
    """
    unfilled: list[int] = []

    def fill(match) -> str:
        step = int(match.group(1))
        record = memory.get(step)
        if record is not None and record.answer.strip():
            return record.answer.strip()
        unfilled.append(step)
        if record is None:
            return ""
        return f"(the answer to: {(record.filled or record.question).rstrip('?')})"

    filled = " ".join(PLACEHOLDER.sub(fill, text).split())
    return filled, unfilled


class Executor(dspy.Module):
    """Executes sub-goals against a retriever, recording each as a :class:`SubGoalRecord`."""

    def __init__(self, retriever: Retriever, *, k: int = 5, max_rewrites: int = 1, write_queries: bool = True,
                 passage_chars: int = 300, query_tokens: int = 32, answer_tokens: int = 64):
        super().__init__()
        self._retriever = Shared(retriever)  # copies of the program search the same index
        self.k = k
        self.max_rewrites = max_rewrites
        self.write_queries = write_queries
        self.passage_chars = passage_chars
        self.write_query = dspy.Predict(WriteQuery, max_tokens=query_tokens)
        self.analyze = dspy.Predict(AnalyzeAnswer, max_tokens=answer_tokens)
        self.rewrite = dspy.Predict(RewriteQuery, max_tokens=query_tokens)

    @property
    def retriever(self) -> Retriever:
        return self._retriever.value

    def forward(self, steps: Iterable[SubGoal], trajectory: Trajectory, round: int = 0) -> dspy.Prediction:
        """Run ``steps`` in the given (dependency) order; ``records`` are also added to the trajectory."""
        return dspy.Prediction(records=[self.run_step(step, trajectory, round) for step in steps])

    def run_step(self, step: SubGoal, trajectory: Trajectory, round: int = 0) -> SubGoalRecord:
        filled, unfilled = fill_placeholders(step.question, memory_of(trajectory))
        record = SubGoalRecord(step=step.id, round=round, question=step.question, filled=filled or step.question,
                               unfilled=unfilled)
        trajectory.subgoals.append(record)  # in memory at once: a failure below still leaves the record
        query = self._first_query(record.filled)
        for attempt in range(self.max_rewrites + 1):
            record.queries.append(query)
            hits = search(self.retriever, query, self.k, trajectory, round=round, step=step.id)
            if hits:
                result = self.analyze(question=record.filled, passages=format_passages(hits, self.passage_chars))
                answer = strip_echo(clean_answer(result.answer))
                said = parse_yes_no(result.answered)
                record.analysis = " ".join((result.analysis or "").split())[:300]
                usable = bool(answer) and not is_non_answer(answer)
                if usable and (said is not False or not record.answer):
                    record.answer = answer  # the best guess so far
                # A missing yes/no is read from the answer itself: a real answer counts as yes.
                if usable and (said if said is not None else True):
                    record.answered = True
                    break
            else:
                record.analysis = "no passages retrieved"
            if attempt < self.max_rewrites:
                rewritten = self.rewrite(question=record.filled, failed_query=query).query
                query = clean_query(rewritten, fallback=record.filled)
                if query in record.queries:  # the same search again would give the same passages
                    break
        return record

    def _first_query(self, sub_question: str) -> str:
        if not self.write_queries:
            return clean_query(sub_question, fallback=sub_question)
        return clean_query(self.write_query(question=sub_question).query, fallback=sub_question)


def findings_text(records: Iterable[SubGoalRecord]) -> str:
    """Sub-questions and their answers, one per line, as the reflector and answer step read them."""
    lines = []
    for record in records:
        answer = record.answer or "unknown"
        mark = "" if record.answered or not record.answer else " (unsure)"
        lines.append(f"- {record.filled or record.question} -> {answer}{mark}")
    return "\n".join(lines) if lines else "(nothing found yet)"
