"""The structured record of one program run.

Every program returns, next to its ``answer``, a :class:`Trajectory`: what it planned, searched, read,
concluded and where it stumbled. Rewards, the bootstrapping optimizer and reports read it, so it is plain
pydantic data (JSON-serialisable), never DSPy objects.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class RetrievedPassage(BaseModel):
    """A passage a search returned, with the query that found it (and the sub-goal it served, if any)."""

    pid: str
    title: str
    text: str = ""
    score: float = 0.0
    query: str = ""
    round: int = 0
    step: int | None = None


class ParseFailureRecord(BaseModel):
    """An LM completion that broke the expected format and was repaired or replaced."""

    module: str
    missing_fields: list[str] = Field(default_factory=list)
    completion: str = ""


class LMUsage(BaseModel):
    """LM calls and tokens spent on one question (cache hits cost nothing and are not counted)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


PlanIssueKind = Literal[
    "unparseable", "fallback_one_step", "truncated", "duplicate_step", "self_reference", "missing_reference",
    "cycle", "reordered", "renumbered",
]


class PlanIssue(BaseModel):
    """Something the tolerant plan parser had to repair (or give up on) in the planner's output."""

    kind: PlanIssueKind
    detail: str = ""


class PlanStepRecord(BaseModel):
    """One step of a plan as it was executed: ``#n`` in ``question`` is the answer of step ``n``."""

    id: int
    question: str
    depends_on: list[int] = Field(default_factory=list)


class PlanRecord(BaseModel):
    """A plan: the LM's raw text, the steps parsed from it, and what the parser repaired."""

    round: int = 0
    source: Literal["planner", "reflection", "question"] = "planner"
    raw: str = ""
    steps: list[PlanStepRecord] = Field(default_factory=list)
    issues: list[PlanIssue] = Field(default_factory=list)
    fallback: bool = False  # no usable plan: the question itself became the only step

    @property
    def repaired(self) -> bool:
        return bool(self.issues)


class SubGoalRecord(BaseModel):
    """How one sub-goal was executed: filled, searched (and re-searched), answered or not."""

    step: int
    round: int = 0
    question: str  # as the plan wrote it, placeholders included
    filled: str = ""  # with placeholders replaced from memory
    unfilled: list[int] = Field(default_factory=list)  # steps whose answer was missing when needed
    queries: list[str] = Field(default_factory=list)  # first query, then each rewrite
    answered: bool = False
    answer: str = ""  # the answer, or the best guess when ``answered`` is False
    analysis: str = ""


class ReflectionRecord(BaseModel):
    """A reflection: was the evidence enough, and if not, what to look for next."""

    round: int
    enough: bool
    follow_ups: list[str] = Field(default_factory=list)
    note: str = ""  # why the loop stopped or what was repaired


class Trajectory(BaseModel):
    """Everything one program run did, in order."""

    program: str
    question: str
    answer: str = ""
    plans: list[PlanRecord] = Field(default_factory=list)
    subgoals: list[SubGoalRecord] = Field(default_factory=list)
    reflections: list[ReflectionRecord] = Field(default_factory=list)
    rounds: int = 0
    queries: list[str] = Field(default_factory=list)
    retrieved: list[RetrievedPassage] = Field(default_factory=list)
    frozen_generator: str | None = None
    frozen_answer: str | None = None  # QAgent plug-and-play: the frozen generator's answer
    parse_failures: list[ParseFailureRecord] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)  # repairs and fallbacks that are not errors
    errors: list[str] = Field(default_factory=list)
    usage: LMUsage = Field(default_factory=LMUsage)

    def retrieved_titles(self) -> list[str]:
        """Titles of everything retrieved, first occurrence order, without duplicates."""
        seen: dict[str, None] = {}
        for passage in self.retrieved:
            seen.setdefault(passage.title, None)
        return list(seen)

    def retrieved_texts(self) -> list[str]:
        """``title: text`` of every distinct retrieved passage (what a frozen generator would read)."""
        seen: dict[str, str] = {}
        for passage in self.retrieved:
            seen.setdefault(passage.pid, f"{passage.title}: {passage.text}")
        return list(seen.values())
