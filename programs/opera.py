"""OPERA: a plan agent decomposes the question; the Reason-Execute Module answers each sub-goal with
analysis-answer and query rewriting over a trajectory memory; the final answer is read off the memory.

    question -> Planner -> plan -> Executor (fill #n from memory, query, retrieve, analyse-answer,
                                             rewrite and retry on "no") -> AnswerStep -> answer
"""

from __future__ import annotations

from typing import Any

from apexdsp.indexes.base import Retriever
from apexdsp.programs.answer import AnswerStep
from apexdsp.programs.base import QAProgram
from apexdsp.programs.config import OperaConfig, PlanExecuteConfig
from apexdsp.programs.evidence import evidence_pool
from apexdsp.programs.executor import Executor, findings_text
from apexdsp.programs.planner import Planner
from apexdsp.programs.trajectory import Trajectory


def build_plan_execute(program: QAProgram, retriever: Retriever, config: PlanExecuteConfig) -> None:
    """Give ``program`` the planner, executor and answer step that OPERA and APEX share."""
    program.planner = Planner(max_steps=config.max_steps, max_tokens=config.plan_tokens)
    program.executor = Executor(retriever, k=config.k, max_rewrites=config.max_rewrites,
                                write_queries=config.write_queries, passage_chars=config.passage_chars,
                                query_tokens=config.query_tokens, answer_tokens=config.analysis_tokens)
    program.answer_step = AnswerStep(config.passage_chars, config.answer_tokens)


def answer_from_memory(program: QAProgram, question: str, trajectory: Trajectory) -> str:
    """The final answer from the sub-answers and the best passages retrieved on the way."""
    passages = evidence_pool(trajectory, program.config.answer_passages)
    final = program.answer_step(question=question, findings=findings_text(trajectory.subgoals),
                                passages=passages, records=trajectory.subgoals)
    if final.used_fallback:
        trajectory.notes.append(f"answer step gave nothing: used the last sub-answer {final.answer!r}")
    return final.answer


class Opera(QAProgram):
    """Plan, execute every sub-goal with analysis-answer and rewrite, answer. No reflection."""

    name = "opera"

    def __init__(self, retriever: Retriever, config: OperaConfig | None = None, **options: Any):
        super().__init__()
        self.config = config or OperaConfig(**options)
        build_plan_execute(self, retriever, self.config)

    def run(self, question: str, trajectory: Trajectory) -> str:
        planned = self.planner(question=question)
        trajectory.plans.append(planned.record)
        self.executor(steps=planned.plan.steps, trajectory=trajectory, round=0)
        trajectory.rounds = 1
        return answer_from_memory(self, question, trajectory)
