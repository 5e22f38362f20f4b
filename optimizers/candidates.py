"""Candidate demo sets and their scores on the validation set (the random-search half of bootstrapping).

As in DSPy's ``BootstrapFewShotWithRandomSearch``: candidate 0 takes each predictor's best-ranked demos up to
its budget; every further candidate shuffles each predictor's pool with its own seed and takes a random
number (1..budget) of demos. Each candidate is a copy of the student with those demos attached, run on the
validation set; the best by the selection metric (ties broken by the configured tie-breakers) wins.

One failure mode is checked before the metric: a 135M model shown a demo often answers every question
with that demo's answer ("Narcissa" for 23 of 50 questions, measured). A candidate whose wrong answers
repeat a demo's answer on more than ``max_copy_rate`` of the validation questions ignores its input; it
ranks below every candidate that does not, whatever its score (a copied answer can be right by chance).
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy

from apexdsp.indexes.base import Retriever
from apexdsp.metrics import normalize_answer
from apexdsp.optimizers.config import BootstrapConfig
from apexdsp.optimizers.demos import Demo, Metric, judge_rollouts, metric_value
from apexdsp.optimizers.rollouts import Rollout, run_traced

logger = logging.getLogger(__name__)

DemoSet = dict[str, list[Demo]]


@dataclass
class CandidateScore:
    """One candidate's validation figures (``index`` -1 is the program without demos)."""

    index: int
    label: str
    demos: dict[str, int]
    metric: float
    em: float
    f1: float
    hit: float | None
    decomposition: float | None
    metric_failures: int = 0
    program_errors: int = 0
    seconds: float = 0.0
    failure_examples: list[str] = field(default_factory=list)
    copy_rate: float = 0.0  # share of wrong answers that repeat a demo's answer word for word

    def key(self, config: BootstrapConfig) -> tuple[float, ...]:
        """The selection key: not degenerate first, then the main metric, then the tie-breakers (a missing
        figure counts as 0)."""
        degenerate = self.index >= 0 and self.copy_rate > config.max_copy_rate
        return (float(not degenerate), self.metric, *(self.figure(name) for name in config.tie_breakers))

    def figure(self, name: str) -> float:
        value = getattr(self, name, None)
        return float(value) if value is not None else 0.0


def build_candidates(pool: dict[str, list[Demo]], budgets: dict[str, int], count: int, seed: int) -> list[DemoSet]:
    """``count`` distinct demo sets from the ranked pools (duplicates, likely with small pools, are dropped)."""
    candidates: list[DemoSet] = []
    seen: set[tuple] = set()
    for index in range(count):
        chosen: DemoSet = {}
        rng = random.Random(seed * 1000 + index)
        for name, demos in pool.items():
            budget = budgets.get(name, 0)
            if budget <= 0 or not demos:
                continue
            if index == 0:
                ranked = sorted(demos, key=lambda d: -d.score)  # stable: ties keep training order
                chosen[name] = diverse_answers(ranked, budget)
            else:
                shuffled = list(demos)
                rng.shuffle(shuffled)
                # 0 is a size too: a small model may do better without demos in some module.
                chosen[name] = shuffled[:rng.randint(0, min(budget, len(shuffled)))]
                if not chosen[name]:
                    del chosen[name]
        fingerprint = tuple(sorted((name, tuple(d.example_id for d in demos)) for name, demos in chosen.items()))
        if chosen and fingerprint not in seen:
            seen.add(fingerprint)
            candidates.append(chosen)
    return candidates


def diverse_answers(ranked: list[Demo], budget: int) -> list[Demo]:
    """The best-ranked demos, taken in turn from each distinct answer: two demos of a yes/no step show a
    "yes" and a "no" (a model shown only "yes" says yes); demos without an answer field keep rank order."""
    groups: dict[str, list[Demo]] = {}
    for demo in ranked:
        groups.setdefault(normalize_answer(str(demo.example.get("answer", id(demo)))), []).append(demo)
    chosen: list[Demo] = []
    while len(chosen) < min(budget, len(ranked)):
        for group in groups.values():
            if group and len(chosen) < budget:
                chosen.append(group.pop(0))
    return chosen


def with_demos(student: dspy.Module, demo_set: DemoSet) -> dspy.Module:
    """A copy of ``student`` whose predictors carry ``demo_set`` (others keep none)."""
    program = student.reset_copy()
    for name, predictor in program.named_predictors():
        predictor.demos = [demo.example for demo in demo_set.get(name, [])]
    return program


def builtin_metric(name: str, rollout: Rollout, verdict: Any) -> float:
    if name == "em":
        return verdict.em
    if name == "f1":
        return verdict.f1
    if name == "hit":
        return verdict.hit or 0.0
    return verdict.plan.value if verdict.plan is not None else 0.0


def score_candidate(program: dspy.Module, valset: Sequence[dspy.Example], *, config: BootstrapConfig,
                    retriever: Retriever | None, metric: Metric | None = None, index: int = 0,
                    label: str = "") -> CandidateScore:
    """Run ``program`` on the valset and score it; a raising metric scores 0 for that example (counted)."""
    started = time.perf_counter()
    rollouts = run_traced(program, valset, threads=config.threads, progress=config.progress)
    verdicts = judge_rollouts(rollouts, config.gates, retriever)
    values, failures = [], []
    for rollout, verdict in zip(rollouts, verdicts):
        try:
            if metric is not None:
                values.append(metric_value(metric(rollout.example, rollout.prediction, None)))
            else:
                values.append(builtin_metric(config.metric, rollout, verdict))
        except Exception as error:  # noqa: BLE001 - a broken metric costs its example, not the compile
            failures.append(f"{rollout.question.id}: {type(error).__name__}: {error}")
            values.append(0.0)
    if failures:
        logger.warning("metric failed on %d of %d validation examples (first: %s)", len(failures), len(values),
                       failures[0])
    demo_answers = {normalize_answer(str(demo["answer"])) for _, predictor in program.named_predictors()
                    for demo in predictor.demos if demo.get("answer")} - {"", "yes", "no"}  # two choices: no copy
    copied = sum(normalize_answer(r.answer) in demo_answers and not v.em for r, v in zip(rollouts, verdicts))
    hits = [v.hit for v in verdicts if v.hit is not None]
    plans = [v.plan.value for v in verdicts if v.plan is not None]
    return CandidateScore(
        index=index, label=label, demos={n: len(p.demos) for n, p in program.named_predictors() if p.demos},
        metric=_mean(values), em=_mean([v.em for v in verdicts]), f1=_mean([v.f1 for v in verdicts]),
        hit=_mean(hits) if hits else None, decomposition=_mean(plans) if plans else None,
        metric_failures=len(failures), program_errors=sum(r.error is not None for r in rollouts),
        seconds=time.perf_counter() - started, failure_examples=failures[:5],
        copy_rate=copied / len(rollouts) if rollouts else 0.0)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


__all__ = ["CandidateScore", "DemoSet", "Metric", "build_candidates", "diverse_answers", "score_candidate", "with_demos"]
