"""Executing plans' searches for the executability component: placeholders filled hop by hop, batched.

A plan is executable when each hop's search finds what the next hop needs. So the steps are searched in
waves (a step once the steps it refers to have been searched), and ``#n`` is filled with:

1. the answer the run's executor found for step ``n`` (when the plan comes from a trajectory);
2. else the answer of the gold step that step ``n`` aligns with (MuSiQue), but only if step ``n``'s own
   search retrieved a passage containing that answer: a hop whose search misses its answer breaks the
   chain, as it would in a real run;
3. else nothing: the placeholder is dropped and the step is searched without it.

Every wave sends the steps of *all* plans of a batch to one ``search_batch`` call, identical queries once,
so scoring a GRPO group of plans costs at most ``max_steps`` retriever calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apexdsp.indexes.base import Retriever
from apexdsp.metrics import answer_hit
from apexdsp.programs.evidence import clean_query
from apexdsp.programs.executor import fill_placeholders
from apexdsp.programs.planner import PLACEHOLDER
from apexdsp.programs.trajectory import PlanStepRecord, SubGoalRecord


@dataclass
class PlanExecution:
    """One plan to search, what may fill its placeholders, and (after :func:`search_plans`) what it found."""

    steps: list[PlanStepRecord]
    executed_answers: dict[int, str] = field(default_factory=dict)
    gold_answers: dict[int, str] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    fills: dict[int, str] = field(default_factory=dict)  # referenced step -> how its #n was filled
    _answers: dict[int, str] = field(default_factory=dict)
    _done: set[int] = field(default_factory=set)

    def referenced(self, step: PlanStepRecord) -> set[int]:
        return {int(n) for n in PLACEHOLDER.findall(step.question)}

    def ready(self) -> list[PlanStepRecord]:
        """Steps not searched yet whose referenced steps are all searched (or absent from the plan)."""
        ids = {step.id for step in self.steps}
        waiting = [step for step in self.steps if step.id not in self._done]
        ready = [step for step in waiting if all(n in self._done or n not in ids for n in self.referenced(step))]
        return ready or waiting  # a forward reference left in a hand-made plan must not stall the loop

    def query_for(self, step: PlanStepRecord) -> str:
        memory = {n: SubGoalRecord(step=n, question="", answer=a) for n, a in self._answers.items()}
        filled, _ = fill_placeholders(step.question, memory)
        for n in self.referenced(step):
            self.fills.setdefault(n, self._fill_source(n))
        return clean_query(filled, fallback=filled) if filled.strip() else ""

    def _fill_source(self, n: int) -> str:
        if n in self._answers:
            if n in self.executed_answers:
                return f"the run's answer {self._answers[n]!r}"
            return f"the gold answer {self._answers[n]!r}, which its search found"
        if n in self.gold_answers:
            return "nothing: its search missed the gold answer"
        return "nothing"

    def record(self, step: PlanStepRecord, query: str, hits: list) -> None:
        """Note a searched step; its answer becomes available to the steps that refer to it."""
        self._done.add(step.id)
        if query:
            self.queries.append(query)
            self.titles.extend(hit.title for hit in hits)
        if step.id in self.executed_answers:
            self._answers[step.id] = self.executed_answers[step.id]
        elif step.id in self.gold_answers and answer_hit(self.gold_answers[step.id],
                                                         [f"{hit.title} {hit.text}" for hit in hits]):
            self._answers[step.id] = self.gold_answers[step.id]

    def fill_note(self) -> str:
        if not self.fills:
            return ""
        return "executability: " + "; ".join(f"#{n} filled with {how}" for n, how in sorted(self.fills.items()))


def search_plans(retriever: Retriever, executions: list[PlanExecution], k: int) -> int:
    """Search every step of every plan, wave by wave; returns the number of ``search_batch`` calls made.

    Raises whatever the retriever raises (the caller decides what a failed search means).
    """
    calls = 0
    while True:
        wave = [(execution, step) for execution in executions for step in execution.ready()]
        if not wave:
            return calls
        queries = [execution.query_for(step) for execution, step in wave]
        distinct = list(dict.fromkeys(query for query in queries if query))
        found = dict(zip(distinct, retriever.search_batch(distinct, k=k))) if distinct else {}
        calls += bool(distinct)
        for (execution, step), query in zip(wave, queries):
            execution.record(step, query, list(found.get(query, [])))
