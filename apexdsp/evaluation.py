"""Evaluate a program on questions: DSPy's ``Evaluate`` for the threads, our metrics for the scores.

Threads matter twice: they overlap the program's Python work, and they let the local LM backend batch
concurrent requests into one ``generate`` call. Per-question results keep the trajectory, so a report can
say not only *what* was answered but *why*.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import dspy
from pydantic import BaseModel, Field

from apexdsp.data.examples import to_examples
from apexdsp.data.records import Question
from apexdsp.eval_checkpoint import EvalCheckpoint, ProgressWriteError
from apexdsp.metrics import answer_hit, exact_match, f1, supporting_title_recall
from apexdsp.programs.trajectory import Trajectory


class QuestionResult(BaseModel):
    """One question's prediction and scores."""

    id: str
    question: str
    gold: str
    prediction: str
    em: float
    f1: float
    hit: float | None = None
    recall: float | None = None
    lm_calls: int = 0
    tokens: int = 0
    plans: int = 0  # planner outputs (plan-based programs)
    plan_fallbacks: int = 0  # ... unusable, replaced by the one-step plan
    plan_repairs: int = 0  # ... that the tolerant parser had to repair (fallbacks included)
    parse_failures: int = 0  # LM completions that broke the adapter's format
    errors: list[str] = Field(default_factory=list)
    trajectory: dict[str, Any] | None = None


class EvalReport(BaseModel):
    """Aggregates over a question set, plus the per-question rows."""

    n: int
    em: float
    f1: float
    hit: float | None
    recall: float | None
    lm_calls: float
    tokens: float
    seconds_per_question: float
    seconds: float
    failures: int
    plan_fallback_rate: float | None = None  # share of planner outputs that fell back to one step
    plan_repair_rate: float | None = None  # share of planner outputs that needed any repair
    parse_failures: float = 0.0  # adapter format failures per question
    # Where the time went, in the last attempt (local LMs only; see BatchStats.time_shares).
    lm_busy_share: float | None = None
    lm_prefill_share: float | None = None
    lm_rows_per_step: float | None = None
    lm_prefix_reused: float | None = None
    lm_capped_share: float | None = None
    lm_kv_padding: float | None = None
    lm_prefill_padding: float | None = None
    results: list[QuestionResult]

    def summary(self) -> dict[str, Any]:
        """The figures without the rows (what ``--json`` prints and MLflow gets as metrics)."""
        return self.model_dump(exclude={"results"})


def score_question(question: Question, prediction: Any, retrieves: bool) -> QuestionResult:
    """Score one prediction against its gold record."""
    answer = str(getattr(prediction, "answer", "") or "") if prediction is not None else ""
    trajectory: Trajectory | None = getattr(prediction, "trajectory", None) if prediction is not None else None
    errors = list(trajectory.errors) if trajectory else ["the program raised; no prediction"]
    hit = recall = None
    if retrieves:
        texts = trajectory.retrieved_texts() if trajectory else []
        titles = trajectory.retrieved_titles() if trajectory else []
        hit = answer_hit(question.answers, texts)
        recall = supporting_title_recall(question.supporting_titles, titles)
    return QuestionResult(
        id=question.id, question=question.question, gold=question.answer, prediction=answer,
        em=exact_match(answer, question.answers), f1=f1(answer, question.answers), hit=hit, recall=recall,
        lm_calls=trajectory.usage.calls if trajectory else 0,
        tokens=trajectory.usage.total_tokens if trajectory else 0,
        errors=errors, trajectory=trajectory.model_dump() if trajectory else None,
        **_plan_counts(trajectory),
    )


def _plan_counts(trajectory: Trajectory | None) -> dict[str, int]:
    """How many plans the planner wrote, and how many the tolerant parser had to repair or replace."""
    if trajectory is None:
        return {}
    plans = [plan for plan in trajectory.plans if plan.source == "planner"]
    return {"plans": len(plans), "plan_fallbacks": sum(plan.fallback for plan in plans),
            "plan_repairs": sum(plan.repaired for plan in plans),
            "parse_failures": len(trajectory.parse_failures)}


def evaluate_program(program: dspy.Module, questions: list[Question], *, threads: int = 8,
                     retrieves: bool = True, progress: bool = True,
                     checkpoint: str | os.PathLike[str] | EvalCheckpoint | None = None,
                     provenance: dict[str, Any] | None = None) -> EvalReport:
    """Run ``program`` on every question with ``threads`` workers and score the answers.

    This is ``dspy.Evaluate``'s own executor (``ParallelExecutor``: DSPy settings propagated into each
    thread, a progress bar, errors counted rather than fatal), used directly for one reason: ``Evaluate``
    resubmits any question still running after 120 s, and a multi-hop agent on a busy 2-core machine can
    take that long, so the same question would be decoded twice. ``timeout=0`` turns that off.
    ``checkpoint``: a progress file of finished questions, or an :class:`EvalCheckpoint` already opened
    (and checked against ``provenance``); an evaluation that is killed and run again with the same file
    runs only the questions it had not finished. A question whose program raised counts as a failure; a
    row that cannot be written stops the evaluation with :class:`ProgressWriteError`.
    """
    from dspy.utils.parallelizer import ParallelExecutor

    from apexdsp.lm.registry import local_engine_stats

    lm_before = local_engine_stats()
    saved = (checkpoint if isinstance(checkpoint, EvalCheckpoint) or checkpoint is None
             else EvalCheckpoint(checkpoint, provenance))
    todo = [q for q in questions if saved is None or q.id not in saved.done]
    executor = ParallelExecutor(num_threads=threads, max_errors=len(todo) + 1,
                                disable_progress_bar=not progress, provide_traceback=False, timeout=0)
    write_errors: list[ProgressWriteError] = []
    started = time.perf_counter()

    def run_one(question: Question) -> QuestionResult | None:
        if write_errors:
            return None  # the run is stopping: start no more questions
        prediction = program(**to_examples([question])[0].inputs())
        result = score_question(question, prediction, retrieves)
        if saved is not None and not write_errors:
            try:
                saved.add(result, time.perf_counter() - started)
            except ProgressWriteError as error:
                write_errors.append(error)
                executor.cancel_jobs.set()
        return result

    try:
        outputs = executor.execute(run_one, todo) if todo else []
    except Exception:
        if write_errors:
            raise write_errors[0] from None
        raise
    if write_errors:
        raise write_errors[0]
    finished = dict(zip((q.id for q in todo), outputs, strict=True))
    attempt_seconds = time.perf_counter() - started
    seconds = attempt_seconds + (saved.previous_seconds if saved else 0.0)
    # Results keep devset order; a question whose program raised comes back as None and scores as such.
    results = [(saved.done.get(q.id) if saved and q.id in saved.done else finished.get(q.id))
               or score_question(q, None, retrieves) for q in questions]
    time_shares = local_engine_stats().since(lm_before).time_shares(attempt_seconds)
    return aggregate(results, seconds, retrieves).model_copy(update=time_shares)


def answer_em_metric(example: dspy.Example, prediction: Any, trace: Any = None) -> float:
    """DSPy-style metric: exact match of ``prediction.answer`` against the example's gold answers."""
    return exact_match(str(getattr(prediction, "answer", "") or ""), list(example.answers))


def decomposition_summary(results: Sequence[QuestionResult], questions: Sequence[Question], retriever: Any, *,
                          k: int = 5, max_steps: int = 4) -> dict[str, float]:
    """Mean decomposition reward of the first plan each question's planner wrote, and of its components.

    This is the reward the bootstrapping gates and the planner's GRPO stage use (same ``k`` and step limit
    by default), read off an evaluation's saved trajectories, so an uncompiled and a compiled program are
    compared on plan quality with no extra LM call: only the plans' sub-questions are searched again
    (``executability``). Rows without a planner plan (retrieve-then-read programs) are left out; with none
    at all the result is empty. ``decomposition_planned`` is how many rows were scored.
    """
    from apexdsp.rewards import decomposition_rewards

    by_id = {question.id: question for question in questions}
    rows = [r for r in results if r.plans and r.trajectory is not None and r.id in by_id]
    if not rows:
        return {}
    rewards = decomposition_rewards([by_id[r.id] for r in rows],
                                    [Trajectory.model_validate(r.trajectory) for r in rows],
                                    retriever=retriever, k=k, max_steps=max_steps)
    summary = {"decomposition": statistics.fmean(reward.value for reward in rewards),
               "decomposition_planned": float(len(rows))}
    for name in sorted({name for reward in rewards for name in reward.components}):
        values = [reward.components[name] for reward in rewards if name in reward.components]
        summary[f"decomposition_{name}"] = statistics.fmean(values)
    return summary


def aggregate(results: list[QuestionResult], seconds: float, retrieves: bool) -> EvalReport:
    """Means over the per-question rows."""
    n = len(results)
    plans = sum(r.plans for r in results)

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else 0.0

    return EvalReport(
        n=n, em=mean([r.em for r in results]), f1=mean([r.f1 for r in results]),
        hit=mean([r.hit for r in results if r.hit is not None]) if retrieves else None,
        recall=mean([r.recall for r in results if r.recall is not None]) if retrieves else None,
        lm_calls=mean([r.lm_calls for r in results]), tokens=mean([r.tokens for r in results]),
        seconds_per_question=seconds / n if n else 0.0, seconds=seconds,
        failures=sum(1 for r in results if r.errors), results=results,
        plan_fallback_rate=sum(r.plan_fallbacks for r in results) / plans if plans else None,
        plan_repair_rate=sum(r.plan_repairs for r in results) / plans if plans else None,
        parse_failures=mean([r.parse_failures for r in results]),
    )
