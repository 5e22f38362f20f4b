"""Running a program over many examples with DSPy's tracing on, in threads.

Both phases of bootstrapping need the same thing: run a program on every example of a set, concurrently
(so the local LM backend can batch the concurrent calls into one ``generate``), and keep for each example
the prediction, the DSPy trace (every ``Predict`` call: predictor, inputs, outputs) and the error, if the
program raised. :func:`run_traced` does that with DSPy's own ``ParallelExecutor`` (settings propagated into
each thread, a progress bar with counts and ETA), the way :func:`apexdsp.evaluation.evaluate_program` does.

Each example runs under its own ``dspy.context(trace=[])``: the trace list lives in that thread's settings
override, so concurrent examples never mix their calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy

from apexdsp.data.records import DecompositionStep, Question
from apexdsp.programs.trajectory import Trajectory

TraceStep = tuple[Any, dict[str, Any], Any]  # (predictor, inputs, outputs) as dspy.Predict records them


@dataclass
class Rollout:
    """One example run once: what came out, the trace of every predictor call, and the error if it raised."""

    question: Question
    example: dspy.Example
    prediction: Any = None
    trace: list[TraceStep] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def answer(self) -> str:
        return str(getattr(self.prediction, "answer", "") or "") if self.prediction is not None else ""

    @property
    def trajectory(self) -> Trajectory | None:
        """The program's :class:`Trajectory`, when it returns one (every apexdsp program does)."""
        trajectory = getattr(self.prediction, "trajectory", None) if self.prediction is not None else None
        return trajectory if isinstance(trajectory, Trajectory) else None


def question_of(example: dspy.Example | Question) -> Question:
    """The :class:`Question` record behind an example (rewards read records, DSPy passes examples).

    Accepts examples made by :func:`apexdsp.data.examples.to_example` and a user's plain
    ``dspy.Example(question=..., answer=...)``; missing labels become empty.
    """
    if isinstance(example, Question):
        return example
    data = example.toDict() if hasattr(example, "toDict") else dict(example)
    answers = [a for a in data.get("answers") or [] if isinstance(a, str)]
    answer = str(data.get("answer") or (answers[0] if answers else ""))
    steps = data.get("decomposition")
    return Question(
        id=str(data.get("id") or f"q{abs(hash(data.get('question', ''))) % 10**10}"),
        question=str(data.get("question") or "?"),
        answer=answer,
        answer_aliases=[a for a in answers if a != answer],
        type=data.get("type"),
        supporting_titles=list(data.get("supporting_titles") or []),
        decomposition=[DecompositionStep(**s) for s in steps] if isinstance(steps, list) else None,
    )


def run_traced(program: dspy.Module, examples: Sequence[dspy.Example], *, threads: int = 8,
               progress: bool = True, on_rollout: Callable[[int, Rollout], None] | None = None) -> list[Rollout]:
    """Run ``program`` on every example with tracing on; results keep the order of ``examples``.

    A program that raises costs its example only: the rollout keeps the error and an empty trace.
    ``on_rollout(index, rollout)`` is called in the worker thread as each example finishes (to judge and
    save it while the others run).
    """
    from dspy.utils.parallelizer import ParallelExecutor

    def run_one(index: int) -> Rollout:
        example = examples[index]
        rollout = Rollout(question=question_of(example), example=example)
        started = time.perf_counter()
        try:
            with dspy.context(trace=[]):
                rollout.prediction = program(**example.inputs())
                rollout.trace = list(dspy.settings.trace)
        except Exception as error:  # noqa: BLE001 - one example must never end a compile
            rollout.error = f"{type(error).__name__}: {error}"
        rollout.seconds = time.perf_counter() - started
        if on_rollout is not None:
            on_rollout(index, rollout)
        return rollout

    # timeout=0: no straggler resubmission (a slow multi-hop question would be decoded twice).
    executor = ParallelExecutor(num_threads=threads, max_errors=len(examples) + 1,
                                disable_progress_bar=not progress, provide_traceback=False, timeout=0)
    return executor.execute(run_one, list(range(len(examples))))


__all__ = ["Rollout", "TraceStep", "question_of", "run_traced"]
