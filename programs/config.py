"""Typed configuration of the search agents: the budgets that bound one question's cost.

Defaults keep a question to a handful of LM calls (300 questions x 5 programs must run on 2 CPU cores);
every bound is an option of ``build_program(name, **options)`` and of the experiment specs.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class VanillaConfig(BaseModel):
    """Closed-book budget: how many tokens the one answer may take."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(24, ge=1, description="max new tokens of the answer")


class AgentConfig(BaseModel):
    """What every program that searches shares: retrieval depth, passage length, answer budget."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(5, ge=1, description="passages retrieved per query")
    passage_chars: int = Field(300, ge=40, description="characters of each passage shown to the LM")
    answer_passages: int = Field(5, ge=1, description="passages shown to the final answer step")
    answer_tokens: int = Field(24, ge=1, description="max new tokens of the final answer")


class RagConfig(AgentConfig):
    """Retrieve-then-read: one search with the question, one LM call."""


class PlanExecuteConfig(AgentConfig):
    """Planner + executor budgets (OPERA; APEX adds the reflector's)."""

    max_steps: int = Field(3, ge=1, description="sub-goals kept from a plan")
    max_rewrites: int = Field(1, ge=0, description="query rewrites per unanswered sub-goal")
    write_queries: bool = Field(True, description="an LM call writes each sub-goal's first query")
    plan_tokens: int = Field(96, ge=8)
    query_tokens: int = Field(32, ge=4)
    analysis_tokens: int = Field(64, ge=8)


class OperaConfig(PlanExecuteConfig):
    """OPERA: plan agent -> analysis-answer + rewrite with trajectory memory -> answer."""


class ApexConfig(PlanExecuteConfig):
    """APEX: planner -> executor -> reflector loop -> answer."""

    max_reflections: int = Field(1, ge=0, description="extra rounds the reflector may open")
    max_follow_ups: int = Field(2, ge=1, description="new sub-goals per extra round")
    reflect_tokens: int = Field(64, ge=8)


class QAgentConfig(AgentConfig):
    """QAgent: rounds of plan -> several queries -> retrieve and merge -> reflect; then answer."""

    max_rounds: int = Field(2, ge=1, description="search rounds (the reflector may stop earlier)")
    max_steps: int = Field(3, ge=1, description="sub-goals kept from the round-1 plan")
    max_queries: int = Field(3, ge=1, description="queries per round")
    max_follow_ups: int = Field(2, ge=1)
    evidence_chars: int = Field(150, ge=40, description="characters per passage shown to the reflector")
    plan_tokens: int = Field(96, ge=8)
    queries_tokens: int = Field(64, ge=8)
    reflect_tokens: int = Field(64, ge=8)
    frozen_generator: str | None = Field(None, description="LM name answering from the collected documents")
