"""APEX: plan, execute, reflect, and answer.

    question -> Planner -> plan -> Executor -> Reflector --enough--> AnswerStep -> answer
                                      ^            |
                                      +-- no: follow-up sub-goals (at most ``max_reflections`` rounds)

The planner and executor are OPERA's; the reflector (QAgent's reflection) checks the collected findings
against the original question and may open further rounds of sub-goals; their records join the same
trajectory memory, so the answer step reads every round's findings.
"""

from __future__ import annotations

from typing import Any

from apexdsp.indexes.base import Retriever
from apexdsp.programs.base import QAProgram
from apexdsp.programs.config import ApexConfig
from apexdsp.programs.executor import findings_text
from apexdsp.programs.opera import answer_from_memory, build_plan_execute
from apexdsp.programs.planner import plan_from_questions
from apexdsp.programs.reflector import Reflector
from apexdsp.programs.trajectory import PlanRecord, PlanStepRecord, Trajectory


class Apex(QAProgram):
    """Planner -> executor -> reflector loop -> answer."""

    name = "apex"

    def __init__(self, retriever: Retriever, config: ApexConfig | None = None, **options: Any):
        super().__init__()
        self.config = config or ApexConfig(**options)
        build_plan_execute(self, retriever, self.config)
        self.reflector = Reflector(max_follow_ups=self.config.max_follow_ups,
                                   max_tokens=self.config.reflect_tokens)

    def run(self, question: str, trajectory: Trajectory) -> str:
        planned = self.planner(question=question)
        trajectory.plans.append(planned.record)
        self.executor(steps=planned.plan.steps, trajectory=trajectory, round=0)
        trajectory.rounds = 1
        for round in range(1, self.config.max_reflections + 1):
            asked = [record.filled for record in trajectory.subgoals] + trajectory.queries
            reflection = self.reflector(question=question, findings=findings_text(trajectory.subgoals),
                                        asked=asked, round=round - 1).reflection
            trajectory.reflections.append(reflection)
            if reflection.enough:
                break
            next_id = max(record.step for record in trajectory.subgoals) + 1
            steps = plan_from_questions(reflection.follow_ups, first_id=next_id)
            trajectory.plans.append(PlanRecord(round=round, source="reflection",
                                               steps=[PlanStepRecord(**s.model_dump()) for s in steps]))
            self.executor(steps=steps, trajectory=trajectory, round=round)
            trajectory.rounds = round + 1
        return answer_from_memory(self, question, trajectory)
