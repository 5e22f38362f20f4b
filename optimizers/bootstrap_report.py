"""What a bootstrap did, as a report: how many traces passed and why, what each candidate scored, what was
kept (:class:`BootstrapReport`, built by :func:`build_report` at the end of ``RewardBootstrap.compile``)."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

import dspy
from pydantic import BaseModel, Field

from apexdsp.optimizers.calibration import CalibrationReport
from apexdsp.optimizers.candidates import CandidateScore, DemoSet
from apexdsp.optimizers.demos import Demo, TraceVerdict


class DemoStats(BaseModel):
    """The demos one predictor received in the chosen set, with the mean of each reward component."""

    predictor: str
    signature: str
    pool: int  # demos that passed its gate
    rejected: int  # calls its module gate turned down
    chosen: int
    component_means: dict[str, float] = Field(default_factory=dict)
    from_examples: list[str] = Field(default_factory=list)


class BootstrapReport(BaseModel):
    """What a compile did: how many traces passed and why, what each candidate scored, what was kept."""

    train_examples: int
    val_examples: int
    passed: dict[str, int]  # ground -> count ("f1", "hit")
    failed: int
    program_errors: int
    train_em: float
    train_f1: float
    train_plan_reward: float | None
    candidates: list[dict[str, Any]]
    chosen: int  # index into candidates (-1: the zero-shot program)
    demos: list[DemoStats]
    bootstrap_seconds: float
    selection_seconds: float
    calibration: CalibrationReport | None = None  # the choice offsets fitted after selection
    teacher_resumed: int = 0  # training questions whose teacher run an interrupted compile had saved
    trace_gate: str = ""  # what decided that a run was good
    gates_not_applied: dict[str, str] = Field(default_factory=dict)  # gate -> why it could not apply
    rejected_reasons: dict[str, int] = Field(default_factory=dict)  # "<predictor>: <why>" -> calls turned down

    def best(self) -> dict[str, Any]:
        return next(c for c in self.candidates if c["index"] == self.chosen)


def build_report(train: list[dspy.Example], val: list[dspy.Example], verdicts: list[TraceVerdict], errors: int,
                 scores: list[CandidateScore], best: CandidateScore, pool: dict[str, list[Demo]], rejected: Counter,
                 chosen: DemoSet, student: dspy.Module, bootstrap_seconds: float,
                 selection_seconds: float) -> BootstrapReport:
    plans = [v.plan.value for v in verdicts if v.plan is not None]
    demos = []
    for name, predictor in student.named_predictors():
        picked = chosen.get(name, [])
        components: dict[str, list[float]] = {}
        for demo in picked:
            for key, value in demo.rewards.items():
                components.setdefault(key, []).append(value)
        demos.append(DemoStats(predictor=name, signature=signature_name(predictor), pool=len(pool.get(name, [])),
                               rejected=rejected.get(name, 0), chosen=len(picked),
                               component_means={k: statistics.fmean(v) for k, v in components.items()},
                               from_examples=[d.example_id for d in picked]))
    return BootstrapReport(
        train_examples=len(train), val_examples=len(val),
        passed=dict(Counter(v.reason for v in verdicts if v.passed)), failed=sum(not v.passed for v in verdicts),
        program_errors=errors, train_em=statistics.fmean(v.em for v in verdicts),
        train_f1=statistics.fmean(v.f1 for v in verdicts),
        train_plan_reward=statistics.fmean(plans) if plans else None,
        candidates=[{**s.__dict__} for s in scores], chosen=best.index, demos=demos,
        bootstrap_seconds=bootstrap_seconds, selection_seconds=selection_seconds)


def signature_name(predictor: Any) -> str:
    return getattr(getattr(predictor, "signature", None), "__name__", "?")


__all__ = ["BootstrapReport", "DemoStats", "build_report", "signature_name"]
