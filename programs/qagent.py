"""QAgent: a search agent that understands the question by planning, querying and reflecting in rounds.

    question -> Planner -> WriteQueries -> search_batch + fuse -> Reflector --enough--> answer
                              ^                                      |
                              +------ no: follow-ups are the next round's plan

In the plug-and-play setting the agent only collects documents and a separate, frozen generator answers
the original question from them (``frozen_generator``: an LM name or a ``dspy.LM``); the frozen reader is
marked compiled, so optimizers leave its prompt alone, and its answer is recorded as ``frozen_answer``.
"""

from __future__ import annotations

from typing import Any

import dspy

from apexdsp.indexes.base import Retriever
from apexdsp.programs.answer import PassageReader
from apexdsp.programs.base import QAProgram
from apexdsp.programs.config import QAgentConfig
from apexdsp.programs.evidence import clean_query, evidence_pool, format_passages, search_many
from apexdsp.programs.planner import PLACEHOLDER, Planner, split_items
from apexdsp.programs.reflector import Reflector
from apexdsp.programs.shared import Shared
from apexdsp.programs.trajectory import PlanRecord, PlanStepRecord, Trajectory


class WriteQueries(dspy.Signature):
    """Write up to 3 short search queries, one per line, that find what the plan needs."""

    question: str = dspy.InputField()
    plan: str = dspy.InputField()
    queries: str = dspy.OutputField(desc="one query per line")


def parse_queries(raw: str | None, fallbacks: list[str], issued: list[str], limit: int,
                  anchor: str = "") -> list[str]:
    """Up to ``limit`` queries not issued before: the LM's first (those sharing a content word with
    ``anchor``), then the fallbacks (sub-questions, the question) to fill the round's quota, since more
    queries cost retrieval time only, not LM calls."""
    queries: list[str] = []
    seen = {query.lower() for query in issued}
    items = split_items(raw or "", questions_only=False)
    written = [clean_query(item.text, fallback="", anchor=anchor) for item in items]
    for text in written + fallbacks:
        query = clean_query(text, fallback="", anchor="")
        if query and query.lower() not in seen:
            seen.add(query.lower())
            queries.append(query)
        if len(queries) == limit:
            break
    return queries


class QAgent(QAProgram):
    """Rounds of plan -> queries -> retrieve and merge -> reflect, then an answer from the merged passages."""

    name = "qagent"

    def __init__(self, retriever: Retriever, config: QAgentConfig | None = None, **options: Any):
        super().__init__()
        frozen = options.pop("frozen_generator", None)
        frozen_lm = frozen if frozen is not None and not isinstance(frozen, str) else None
        self.config = config or QAgentConfig(frozen_generator=frozen if isinstance(frozen, str) else None,
                                             **options)
        self._retriever = Shared(retriever)  # copies of the program search the same index
        self.planner = Planner(max_steps=self.config.max_steps, max_tokens=self.config.plan_tokens)
        self.write_queries = dspy.Predict(WriteQueries, max_tokens=self.config.queries_tokens)
        self.reflector = Reflector(max_follow_ups=self.config.max_follow_ups,
                                   max_tokens=self.config.reflect_tokens)
        self.reader = PassageReader(self.config.passage_chars, self.config.answer_tokens)
        if frozen_lm is None and self.config.frozen_generator:
            from apexdsp.lm.registry import get_lm

            frozen_lm = get_lm(self.config.frozen_generator)
        self._frozen_lm = Shared(frozen_lm)
        self.frozen_reader = None
        if frozen_lm is not None:
            self.frozen_reader = PassageReader(self.config.passage_chars, self.config.answer_tokens)
            self.frozen_reader._compiled = True  # frozen: optimizers skip compiled sub-modules

    @property
    def retriever(self) -> Retriever:
        return self._retriever.value

    def run(self, question: str, trajectory: Trajectory) -> str:
        steps: list[str] = []
        for round in range(self.config.max_rounds):
            if round == 0:
                planned = self.planner(question=question, round=0)
                trajectory.plans.append(planned.record)
                steps = [step.question for step in planned.plan.steps]
            else:
                trajectory.plans.append(PlanRecord(round=round, source="reflection", steps=[
                    PlanStepRecord(id=i, question=text) for i, text in enumerate(steps, start=1)]))
            plan_text = "\n".join(f"{i}. {text}" for i, text in enumerate(steps, start=1))
            raw = self.write_queries(question=question, plan=plan_text).queries
            fallbacks = [PLACEHOLDER.sub("", text).strip() for text in steps] + [question]
            queries = parse_queries(raw, fallbacks, trajectory.queries, self.config.max_queries,
                                    anchor=f"{question} {plan_text}")
            search_many(self.retriever, queries, self.config.k, trajectory, round=round)
            trajectory.rounds = round + 1
            if round + 1 == self.config.max_rounds:
                break
            pool = evidence_pool(trajectory, self.config.answer_passages)
            findings = format_passages(pool, self.config.evidence_chars)
            reflection = self.reflector(question=question, findings=findings, asked=trajectory.queries,
                                        round=round).reflection
            trajectory.reflections.append(reflection)
            if reflection.enough:
                break
            steps = reflection.follow_ups
        return self.answer(question, trajectory)

    @property
    def frozen_lm(self) -> dspy.BaseLM | None:
        return self._frozen_lm.value

    def answer(self, question: str, trajectory: Trajectory) -> str:
        """The agent's own reader, or the frozen generator on the documents the agent collected."""
        passages = evidence_pool(trajectory, self.config.answer_passages)
        if self.frozen_reader is None:
            return self.reader(question=question, passages=passages).answer
        trajectory.frozen_generator = getattr(self.frozen_lm, "model", None) or str(self.config.frozen_generator)
        with dspy.context(lm=self.frozen_lm):
            trajectory.frozen_answer = self.frozen_reader(question=question, passages=passages).answer
        return trajectory.frozen_answer
