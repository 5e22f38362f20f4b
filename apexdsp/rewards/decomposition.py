"""The decomposition reward: how good a plan is, before (or without) executing it.

After APEX-Searcher (a reward on the decomposition itself, so the planner learns to plan rather than to
answer) and OPERA (plans judged on structure and on whether their steps can be executed). Five
components in [0, 1], combined by :class:`DecompositionWeights` (renormalised over the ones available):

* ``format``, ``structure``, ``placeholder``, ``gold_agreement``: see :mod:`apexdsp.rewards.plan_checks`.
* ``executability`` (retrieval-grounded): the plan's sub-questions, with ``#n`` filled, are searched in
  the index, and the reward is the share of the gold supporting titles found in the union of their
  top-k. This is what a plan is *for*: a fluent plan whose steps retrieve nothing relevant is useless to
  the executor. ``#n`` is filled with the trajectory's sub-answer when the plan was executed, else with
  the answer of the aligned gold step (MuSiQue) when that step's own search found it, else dropped
  (see :mod:`apexdsp.rewards.executability`).

A plan can be given as a raw planner completion (parsed with the planner's own tolerant parser, as GRPO
needs), a :class:`~apexdsp.programs.planner.Plan` / ``PlanParse`` / ``PlanRecord``, or a whole
:class:`~apexdsp.programs.trajectory.Trajectory` (its first planner plan and its sub-answers). A plan
that falls back to the question itself (nothing parsed) scores 0, with only ``format`` (0) reported: the
substitute plan is not the planner's work, and crediting its search would pay the planner for failing. :func:`decomposition_rewards` scores many plans with batched searches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator

from apexdsp.data.records import Question
from apexdsp.errors import ApexError
from apexdsp.indexes.base import Retriever
from apexdsp.metrics import supporting_title_recall
from apexdsp.programs.evidence import is_non_answer
from apexdsp.programs.planner import Plan, PlanParse, parse_plan
from apexdsp.programs.trajectory import PlanIssue, PlanRecord, PlanStepRecord, Trajectory
from apexdsp.rewards.base import RewardResult, register_reward, weighted_mean
from apexdsp.rewards.executability import PlanExecution, search_plans
from apexdsp.rewards.plan_checks import (align_to_gold, format_score, gold_agreement_score, gold_fill_answers,
                                         placeholder_score, question_needs, structure_score)

logger = logging.getLogger(__name__)

PlanInput = str | None | list | Plan | PlanParse | PlanRecord | Trajectory
COMPONENTS = ("format", "structure", "placeholder", "executability", "gold_agreement")


class DecompositionWeights(BaseModel):
    """Weights of the components. Retrieval-grounded executability weighs most: it is the plan's purpose.

    Only the components computed for a question count, and the weights are renormalised over them, so
    the reward stays in [0, 1]: ``gold_agreement`` only where a gold decomposition exists, ``executability``
    only with a retriever and gold supporting titles, ``placeholder`` only when the question type says
    which steps must chain.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: float = Field(0.2, ge=0)
    structure: float = Field(0.2, ge=0)
    placeholder: float = Field(0.1, ge=0)
    executability: float = Field(0.4, ge=0)
    gold_agreement: float = Field(0.1, ge=0)

    @model_validator(mode="after")
    def _some_weight(self) -> DecompositionWeights:
        if not any(self.as_dict().values()):
            raise ValueError("at least one decomposition weight must be positive")
        return self

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in COMPONENTS}


@dataclass
class _Candidate:
    """One plan in the form every check reads: steps, the parser's repairs, and known sub-answers."""

    steps: list[PlanStepRecord]
    issues: list[PlanIssue] = field(default_factory=list)
    fallback: bool = False
    sub_answers: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def completion_text(completion: str | list | None) -> str | None:
    """The text of a completion: a string as it is; a chat-format completion (TRL's conversational
    datasets give ``[{"role": "assistant", "content": ...}]``) as its messages' contents joined."""
    if not isinstance(completion, list):
        return completion
    return "\n".join(str(m.get("content") or "") if isinstance(m, dict) else str(m) for m in completion)


def _candidate(question: Question, plan: PlanInput, max_steps: int) -> _Candidate:
    if isinstance(plan, list):
        plan = completion_text(plan)
    if plan is None or isinstance(plan, str):
        return _candidate(question, parse_plan(plan, question.question, max_steps=max_steps), max_steps)
    if isinstance(plan, Trajectory):
        return _from_trajectory(question, plan, max_steps)
    if isinstance(plan, PlanParse):
        record = plan.plan.to_record(issues=plan.issues, fallback=plan.fallback)
    elif isinstance(plan, Plan):
        record = plan.to_record()
    elif isinstance(plan, PlanRecord):
        record = plan
    else:
        raise TypeError(f"cannot score a plan given as {type(plan).__name__}; give a completion text, a Plan, "
                        "a PlanParse, a PlanRecord or a Trajectory")
    steps, issues = list(record.steps), list(record.issues)
    if len(steps) > max_steps:
        issues.append(PlanIssue(kind="truncated", detail=f"{len(steps)} steps, scored {max_steps}"))
        steps = steps[:max_steps]
    return _Candidate(steps=steps, issues=issues, fallback=record.fallback or not steps)


def _from_trajectory(question: Question, trajectory: Trajectory, max_steps: int) -> _Candidate:
    """The first planner plan of a run, with the sub-answers the executor found for its steps."""
    record = next((plan for plan in trajectory.plans if plan.source == "planner"), None)
    if record is None:
        return _Candidate(steps=[], fallback=True, notes=[f"{trajectory.program} trajectory has no planner plan"])
    candidate = _candidate(question, record, max_steps)
    for subgoal in trajectory.subgoals:
        if subgoal.round == record.round and subgoal.answer.strip() and not is_non_answer(subgoal.answer):
            candidate.sub_answers[subgoal.step] = subgoal.answer.strip()
    return candidate


@dataclass
class _Pending:
    """A plan whose retrieval-free components are done and whose steps await the batched search."""

    components: dict[str, float]
    notes: list[str]
    execution: PlanExecution


def _score_without_retrieval(question: Question, candidate: _Candidate, max_steps: int) -> _Pending | RewardResult:
    notes = list(candidate.notes)
    format_value, format_notes = format_score(candidate.issues, candidate.fallback)
    notes += format_notes
    if candidate.fallback:
        notes.append("no other component scored: the fallback plan is the question, not the planner's work")
        return RewardResult(0.0, {"format": 0.0}, notes)
    needs = question_needs(question, max_steps)
    components = {"format": format_value}
    components["structure"], structure_notes = structure_score(question, candidate.steps, needs)
    placeholder, placeholder_notes = placeholder_score(candidate.steps, needs)
    notes += structure_notes + placeholder_notes
    if placeholder is not None:
        components["placeholder"] = placeholder
    alignment = align_to_gold(candidate.steps, question)
    agreement, agreement_notes = gold_agreement_score(candidate.steps, question, alignment)
    notes += agreement_notes
    if agreement is not None:
        components["gold_agreement"] = agreement
    execution = PlanExecution(candidate.steps, executed_answers=candidate.sub_answers,
                              gold_answers=gold_fill_answers(question, alignment))
    return _Pending(components, notes, execution)


def decomposition_rewards(questions: Sequence[Question], plans: Sequence[PlanInput], *,
                          retriever: Retriever | None = None, k: int = 5,
                          weights: DecompositionWeights | dict[str, float] | None = None,
                          max_steps: int = 4) -> list[RewardResult]:
    """Score each plan against its question, searching the steps of all plans together.

    The searches go out in at most ``max_steps`` waves of one ``search_batch`` call each (see
    :mod:`apexdsp.rewards.executability`). ``retriever=None``, or a question without
    ``supporting_titles``, leaves ``executability`` out; so does a retriever that fails, with a note
    and a logged warning (the search, not the plan, was at fault).
    """
    if len(questions) != len(plans):
        raise ValueError(f"{len(questions)} questions for {len(plans)} plans")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ApexError(f"k must be a positive integer, got {k!r}")
    if max_steps < 1:
        raise ApexError(f"max_steps must be >= 1, got {max_steps}")
    weights = DecompositionWeights.model_validate(weights or {})
    scored = [_score_without_retrieval(q, _candidate(q, p, max_steps), max_steps) for q, p in zip(questions, plans)]
    searched = [item for q, item in zip(questions, scored) if isinstance(item, _Pending) and q.supporting_titles]
    failure = None
    if retriever is not None and searched:
        try:
            search_plans(retriever, [item.execution for item in searched], k)
        except Exception as error:  # noqa: BLE001 - a broken index must not end a training step
            logger.warning("decomposition reward: search failed: %s", error)
            failure = f"{type(error).__name__}: {error}"
    results: list[RewardResult] = []
    for question, item in zip(questions, scored):
        if isinstance(item, RewardResult):
            results.append(item)
            continue
        if retriever is None:
            item.notes.append("executability: not scored, no retriever given")
        elif not question.supporting_titles:
            item.notes.append("executability: not scored, the question has no supporting titles")
        elif failure is not None:
            item.notes.append(f"executability: not scored, the search failed ({failure})")
        else:
            execution = item.execution
            recall = supporting_title_recall(question.supporting_titles, execution.titles)
            item.components["executability"] = recall
            item.notes += [note for note in [execution.fill_note()] if note]
            item.notes.append(f"executability: {len(execution.queries)} sub-questions searched at k={k}, "
                              f"recall {recall:.2f} of {len(set(question.supporting_titles))} gold titles")
        results.append(RewardResult(weighted_mean(item.components, weights.as_dict()), item.components, item.notes))
    return results


@register_reward("decomposition")
def decomposition_reward(question: Question, plan_or_completion: PlanInput, *, retriever: Retriever | None = None,
                         k: int = 5, weights: DecompositionWeights | dict[str, float] | None = None,
                         max_steps: int = 4) -> RewardResult:
    """The decomposition reward of one plan (a raw completion, a plan object, or a trajectory).

    ``weights``: a :class:`DecompositionWeights` or a dict of some of its fields (from a config file).
    """
    return decomposition_rewards([question], [plan_or_completion], retriever=retriever, k=k, weights=weights,
                                 max_steps=max_steps)[0]


def decomposition_reward_from_trajectory(question: Question, trajectory: Trajectory, *,
                                         retriever: Retriever | None = None, k: int = 5,
                                         weights: DecompositionWeights | dict[str, float] | None = None,
                                         max_steps: int = 4) -> RewardResult:
    """The reward of a run's first planner plan, ``#n`` filled with the sub-answers the run found."""
    return decomposition_reward(question, trajectory, retriever=retriever, k=k, weights=weights, max_steps=max_steps)


__all__ = ["DecompositionWeights", "completion_text", "decomposition_reward", "decomposition_reward_from_trajectory",
           "decomposition_rewards"]
