"""The MLflow run of a bootstrap: its settings, each candidate's scores as it is scored, and the choice.

A bootstrap is one run (``bootstrap``, tag ``apexdsp.kind`` ``bootstrap``): the child of the run active
when it starts (a compile's parent run, opened by ``apexdsp compile`` or by the caller), else a top-level
run in the ``apexdsp-compile`` experiment; nothing is logged under ``tracking_disabled()``.

The candidates are steps of the run's metrics, not runs of their own: ``candidate/metric``,
``candidate/em``, ``candidate/f1`` ... at step ``index + 1`` (0: the program without demos, 1: the
top-ranked demo set, ``k + 1``: random set ``k``), each logged the moment the candidate is scored. The
run's charts then show the random search as it goes, one point per candidate, and the table artifact
``candidates.json`` names each step's candidate (label, demos per predictor, every figure, whether it was
chosen). A run per candidate would add four to ten runs to every compile in the runs list, each a
validation pass rather than a job, with no params of its own to compare.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from apexdsp.optimizers.bootstrap_report import BootstrapReport
from apexdsp.optimizers.candidates import CandidateScore
from apexdsp.tracking.run import TrackedRun, run_active, tracked_run

CANDIDATE_FIGURES = ("metric", "em", "f1", "hit", "decomposition", "copy_rate", "seconds", "program_errors",
                     "metric_failures")
RUN_NAME = "bootstrap"


@contextlib.contextmanager
def bootstrap_run(experiment: str, params: Mapping[str, Any]) -> Iterator[TrackedRun]:
    """The bootstrap's run, nested in the active run if there is one; ended FAILED if the body raises."""
    with tracked_run(experiment, run_name=RUN_NAME, params=params, nested=run_active(),
                     tags={"apexdsp.kind": "bootstrap"}) as run:
        yield run


def candidate_step(score: CandidateScore) -> int:
    """The metric step of a candidate: its index + 1 (the program without demos, index -1, is step 0)."""
    return score.index + 1


def log_candidate(run: TrackedRun, score: CandidateScore) -> None:
    """One candidate's validation figures, at its step (figures it has none of, as ``hit`` for a program
    that records no retrieval, are left out)."""
    run.log_metrics({f"candidate/{name}": getattr(score, name) for name in CANDIDATE_FIGURES},
                    step=candidate_step(score))


def log_outcome(run: TrackedRun, report: BootstrapReport, seconds: float) -> None:
    """What the bootstrap chose and what it cost: metrics, the chosen candidate's label as a tag, and the
    candidates, demos and full report as artifacts."""
    best = report.best()
    run.log_metrics({
        "compile_seconds": seconds, "bootstrap_seconds": report.bootstrap_seconds,
        "selection_seconds": report.selection_seconds, "traces_passed": sum(report.passed.values()),
        "traces_failed": report.failed, "program_errors": report.program_errors, "train_em": report.train_em,
        "train_f1": report.train_f1, "train_plan_reward": report.train_plan_reward,
        "teacher_resumed": report.teacher_resumed, "candidates_scored": len(report.candidates),
        "chosen_candidate": report.chosen, "demos_chosen": sum(d.chosen for d in report.demos),
        **{f"chosen/{name}": best.get(name) for name in CANDIDATE_FIGURES}})
    run.set_tags({"apexdsp.chosen_candidate": best["label"]})
    run.log_table([{"step": c["index"] + 1, "candidate": c["label"], "chosen": c["index"] == report.chosen,
                    "demos": sum(c["demos"].values()), "demos_by_predictor": c["demos"],
                    **{name: c.get(name) for name in CANDIDATE_FIGURES}} for c in report.candidates],
                  "candidates.json")
    run.log_table([{"predictor": d.predictor, "signature": d.signature, "pool": d.pool, "rejected": d.rejected,
                    "chosen": d.chosen, "from_examples": d.from_examples, "component_means": d.component_means}
                   for d in report.demos], "demos.json")
    if report.calibration is not None and report.calibration.predictors:
        run.log_table([fit.model_dump() for fit in report.calibration.predictors], "choice_calibration.json")
        run.log_metrics({f"calibration/{fit.predictor}/offset": fit.offset for fit in report.calibration.predictors})
    run.log_json(report.model_dump(), "bootstrap_report.json")


__all__ = ["CANDIDATE_FIGURES", "bootstrap_run", "candidate_step", "log_candidate", "log_outcome"]
