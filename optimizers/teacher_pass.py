"""The teacher pass of a bootstrap, question by question: run, judge, keep the demos, save.

Running the teacher over the trainset is the longest phase of a bootstrap (an hour for 120 HotpotQA
questions through a planner-executor program on two CPU cores). Each question's outcome (the trace
gate's verdict, the demos its module calls gave, the calls turned down) depends on that question alone,
so it is judged as soon as its rollout finishes and handed to ``on_outcome``, which saves it
(:meth:`~apexdsp.optimizers.checkpoint.CompileCheckpoint.save_teacher_outcomes`): an interrupted pass
resumes with the questions not yet judged, and loses at most the ones in flight.

Outcomes are kept by the question's position in the trainset and pooled in that order, so the demo pools,
and hence the candidate sets drawn from them, do not depend on which thread finished first.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dspy

from apexdsp.errors import ApexError
from apexdsp.indexes.base import Retriever
from apexdsp.optimizers.config import DemoGates
from apexdsp.optimizers.demos import (Demo, Metric, TraceVerdict, extract_demos, judge_rollouts, metric_name,
                                     query_writers)
from apexdsp.optimizers.rollouts import Rollout, question_of, run_traced


@dataclass
class QuestionOutcome:
    """What the teacher's run on one training question gave: its verdict, its demos, the calls turned down."""

    verdict: TraceVerdict
    demos: list[Demo] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    raised: bool = False  # the program raised (its verdict says why)
    reasons: dict[str, int] = field(default_factory=dict)  # "<predictor>: <why>" -> calls turned down


Outcomes = dict[int, QuestionOutcome]  # position in the trainset -> outcome


def run_teacher(teacher: dspy.Module, train: Sequence[dspy.Example], predictor_names: dict[int, str],
                gates: DemoGates, retriever: Retriever | None, *, threads: int, progress: bool,
                done: Outcomes | None = None, on_outcome: Callable[[Outcomes], None] | None = None,
                metric: Metric | None = None, metric_threshold: float | None = None) -> Outcomes:
    """The outcome of every training question: those in ``done`` as given, the others by running ``teacher``.

    ``metric`` (DSPy's ``metric(example, prediction, trace)``) is the trace gate when given, else ``gates``.
    ``on_outcome`` receives all outcomes so far each time one is added (from a worker thread, one call at a
    time). The caller runs this under the teacher's ``dspy.context``.
    """
    outcomes: Outcomes = dict(done or {})
    todo = [position for position in range(len(train)) if position not in outcomes]
    lock = threading.Lock()
    failures: list[str] = []

    def judge(index: int, rollout: Rollout) -> None:
        try:
            verdict = judge_rollouts([rollout], gates, retriever, metric=metric, metric_threshold=metric_threshold)[0]
            reasons: dict[str, int] = {}
            demos, turned_down = extract_demos(rollout, verdict, predictor_names, gates, reasons)
            outcome = QuestionOutcome(verdict, demos, dict(turned_down), rollout.error is not None, reasons)
        except Exception as error:  # noqa: BLE001 - reported below, after the other questions ran
            failures.append(f"{type(error).__name__}: {error}")
            return
        with lock:
            outcomes[todo[index]] = outcome
            if on_outcome is not None:
                on_outcome(outcomes)

    if todo:
        run_traced(teacher, [train[position] for position in todo], threads=threads, progress=progress,
                   on_rollout=judge)
    missing = [position for position in todo if position not in outcomes]
    if missing:
        raise ApexError(f"bootstrap: judging the teacher's run failed on {len(missing)} training questions "
                        f"(first: {failures[0] if failures else 'no outcome'})")
    return outcomes


def pooled(outcomes: Outcomes) -> tuple[dict[str, list[Demo]], Counter, list[TraceVerdict], int]:
    """Demo pools per predictor, calls turned down per predictor, verdicts and errors, in trainset order."""
    pool: dict[str, list[Demo]] = {}
    rejected: Counter = Counter()
    verdicts = []
    for position in sorted(outcomes):
        outcome = outcomes[position]
        verdicts.append(outcome.verdict)
        rejected.update(outcome.rejected)
        for demo in outcome.demos:
            pool.setdefault(demo.predictor, []).append(demo)
    return pool, rejected, verdicts, sum(outcome.raised for outcome in outcomes.values())


def rejection_reasons(outcomes: Outcomes) -> Counter:
    """Module calls turned down, by ``"<predictor>: <why>"``."""
    reasons: Counter = Counter()
    for outcome in outcomes.values():
        reasons.update(outcome.reasons)
    return reasons


NOT_RECORDED = "the program records no retrieved passages (no apexdsp Trajectory in its prediction)"


def gates_summary(gates: DemoGates, verdicts: Sequence[TraceVerdict], train: Sequence[dspy.Example],
                  program: dspy.Module, metric: Metric | None = None,
                  metric_threshold: float | None = None) -> tuple[str, dict[str, str]]:
    """The trace gate in words, and apexdsp's gates that could not apply to ``program``, with why: a gate
    reads what the program records (its trajectory, the examples' labels), and one that finds nothing to
    read is skipped rather than rejecting every run."""
    judged = [v for v in verdicts if not v.reason.startswith("error")]
    unrecorded = bool(judged) and all(v.hit is None for v in judged)
    not_applied: dict[str, str] = {}
    if metric is not None:
        threshold = f" >= {metric_threshold}" if metric_threshold is not None else " true"
        trace_gate = f"metric {metric_name(metric)}{threshold}"
    else:
        trace_gate = f"answer F1 >= {gates.min_answer_f1}" + (" or gold answer retrieved" if gates.accept_hit else "")
        if gates.accept_hit and unrecorded:
            not_applied["gold answer retrieved"] = NOT_RECORDED
    queries = query_writers(program)
    if queries and gates.require_query_hit:
        gate = f"query found a gold paragraph ({', '.join(queries)})"
        if unrecorded:
            not_applied[gate] = NOT_RECORDED
        elif not any(question_of(example).supporting_titles for example in train):
            not_applied[gate] = "the training examples name no supporting_titles"
    return trace_gate, not_applied


__all__ = ["Outcomes", "QuestionOutcome", "gates_summary", "pooled", "rejection_reasons", "run_teacher"]
