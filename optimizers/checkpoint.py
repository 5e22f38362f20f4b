"""Resuming an interrupted compile: the finished parts of a bootstrap, kept in one JSON file.

Running the teacher over the trainset and each candidate over the valset are the expensive parts (minutes
each on a CPU). :class:`CompileCheckpoint` records each teacher question and each candidate as it
finishes (atomically: a killed process leaves the previous version of the file), under a fingerprint of
everything that determines the result (program modules, config, data, labeled plans). A rerun with the
same fingerprint skips what is done; a rerun with anything changed ignores the stale file and starts over,
saying so.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import dspy

from apexdsp.optimizers.demos import Demo, TraceVerdict
from apexdsp.optimizers.teacher_pass import Outcomes, QuestionOutcome
from apexdsp.rewards import RewardResult
from apexdsp.tracking import write_json_atomic

logger = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def demo_to_json(demo: Demo) -> dict[str, Any]:
    return {"predictor": demo.predictor, "signature": demo.signature, "example": demo.example.toDict(),
            "score": demo.score, "example_id": demo.example_id, "rewards": demo.rewards}


def demo_from_json(data: dict[str, Any]) -> Demo:
    return Demo(data["predictor"], data["signature"], dspy.Example(**data["example"]), data["score"],
                data["example_id"], data["rewards"])


def verdict_to_json(verdict: TraceVerdict) -> dict[str, Any]:
    plan = None if verdict.plan is None else {"value": verdict.plan.value, "components": verdict.plan.components}
    return {"example_id": verdict.example_id, "passed": verdict.passed, "reason": verdict.reason, "em": verdict.em,
            "f1": verdict.f1, "hit": verdict.hit, "plan": plan}


def verdict_from_json(data: dict[str, Any]) -> TraceVerdict:
    plan = data.get("plan")
    return TraceVerdict(data["example_id"], data["passed"], data["reason"], data["em"], data["f1"], data["hit"],
                        None if plan is None else RewardResult(plan["value"], plan["components"]))


class CompileCheckpoint:
    """The phases of one compile that already finished, in ``path``, valid for one fingerprint."""

    def __init__(self, path: str | Path, key: str):
        self.path = Path(path)
        self.key = key
        self.state: dict[str, Any] = {"fingerprint": key, "teacher": {}, "bootstrap": None, "candidates": {}}
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
            except ValueError:
                saved = {}
            if saved.get("fingerprint") == key:
                self.state = saved
                logger.info("resuming the compile from %s", self.path)
            else:
                logger.info("%s belongs to another compile (settings or data changed): starting over", self.path)

    def teacher_outcomes(self) -> Outcomes:
        """The training questions the teacher pass judged before it was interrupted, by position."""
        return {int(position): QuestionOutcome(verdict_from_json(data["verdict"]),
                                               [demo_from_json(d) for d in data["demos"]], data["rejected"],
                                               data["raised"], data.get("reasons") or {})
                for position, data in (self.state.get("teacher") or {}).items()}

    def save_teacher_outcomes(self, outcomes: Outcomes) -> None:
        self.state["teacher"] = {str(position): {"verdict": verdict_to_json(o.verdict),
                                                 "demos": [demo_to_json(d) for d in o.demos],
                                                 "rejected": o.rejected, "raised": o.raised,
                                                 "reasons": o.reasons}
                                 for position, o in outcomes.items()}
        write_json_atomic(self.state, self.path)

    @property
    def bootstrap(self) -> dict[str, Any] | None:
        return self.state.get("bootstrap")

    def save_bootstrap(self, pool: dict[str, list[Demo]], rejected: dict[str, int], verdicts: list[TraceVerdict],
                       errors: int, reasons: dict[str, int] | None = None) -> None:
        self.state["bootstrap"] = {"pool": {k: [demo_to_json(d) for d in v] for k, v in pool.items()},
                                   "rejected": dict(rejected), "verdicts": [verdict_to_json(v) for v in verdicts],
                                   "errors": errors, "reasons": dict(reasons or {})}
        self.state["teacher"] = {}  # the finished pass above holds it all
        write_json_atomic(self.state, self.path)

    def load_bootstrap(self) -> tuple[dict[str, list[Demo]], dict[str, int], list[TraceVerdict], int]:
        done = self.state["bootstrap"]
        return ({k: [demo_from_json(d) for d in v] for k, v in done["pool"].items()}, done["rejected"],
                [verdict_from_json(v) for v in done["verdicts"]], done["errors"])

    def rejection_reasons(self) -> Counter:
        """Why the pooled pass's module calls were rejected (the report's ``rejected_reasons``)."""
        return Counter(self.state["bootstrap"].get("reasons") or {})

    def candidate(self, index: int) -> dict[str, Any] | None:
        return self.state["candidates"].get(str(index))

    def save_candidate(self, index: int, score: dict[str, Any]) -> None:
        self.state["candidates"][str(index)] = score
        write_json_atomic(self.state, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @staticmethod
    def describe(path: str | Path) -> str | None:
        """How far the compile saved in ``path`` got, for a progress line (None when nothing is saved).

        Read without the fingerprint: it reports what is on disk, whichever compile wrote it.
        """
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        if state.get("bootstrap") is None:
            return f"teacher pass: {len(state.get('teacher') or {})} training questions judged"
        return f"teacher pass done, {len(state.get('candidates') or {})} candidates scored"


__all__ = ["CompileCheckpoint", "fingerprint"]
