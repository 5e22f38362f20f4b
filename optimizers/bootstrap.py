"""Reward-gated bootstrapping: few-shot demos for each module, chosen by the rewards later stages train on.

    trainset --teacher, traced--> rollouts --trace gate--> passing runs --module gates--> demo pools
    demo pools --random search--> candidate demo sets --valset, metric--> the chosen student
    the chosen student --choice calibration on the trainset (calibrate_choices)--> the compiled student

The shape is DSPy's ``BootstrapFewShotWithRandomSearch``; what differs is *which* traces become demos.
DSPy keeps a trace when one metric accepts the final answer, and then every module call in it becomes a
demo. Here the trace gate is that metric when one is given (``metric=``, DSPy's rule, ``metric_threshold``
as in DSPy), else apexdsp's answer gates (:class:`~apexdsp.optimizers.config.DemoGates`). A multi-hop
agent can reach a right answer through a bad plan (the small model guessed) and a wrong answer through a
good one (the reader failed), so each module's call must also pass its own reward where the program
records what it checks: a plan is shown only if its decomposition reward is high, a query only if it
found a gold paragraph, an answer only if it is right (:mod:`apexdsp.optimizers.demos`). A call whose
output is junk (a template echo, no word) is never a demo. The report says which gates applied
(``trace_gate``, ``gates_not_applied``) and why calls were turned down (``rejected_reasons``). The teacher
runs the questions in threads so the batching LM backend decodes them together.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import dspy
from dspy.teleprompt.teleprompt import Teleprompter

from apexdsp.data.examples import as_examples
from apexdsp.data.records import Question
from apexdsp.errors import ApexError
from apexdsp.indexes.base import Retriever
from apexdsp.optimizers.bootstrap_report import BootstrapReport, DemoStats, build_report, signature_name
from apexdsp.optimizers.bootstrap_run import bootstrap_run, log_candidate, log_outcome
from apexdsp.optimizers.checkpoint import CompileCheckpoint, fingerprint
from apexdsp.optimizers.compiled import examples_digest
from apexdsp.optimizers.calibration import CalibrationConfig, ChoiceCalibration
from apexdsp.optimizers.candidates import CandidateScore, Metric, build_candidates, score_candidate, with_demos
from apexdsp.optimizers.config import BootstrapConfig
from apexdsp.optimizers.demos import Demo, TraceVerdict, labeled_plan_demos, metric_name
from apexdsp.optimizers.teacher_pass import Outcomes, gates_summary, pooled, rejection_reasons, run_teacher
from apexdsp.programs.shared import Shared
from apexdsp.tracking.dspy_autolog import FollowsDSPyAutolog
from apexdsp.tracking.run import COMPILE_EXPERIMENT, TrackedRun, UntrackedRun, flat_params

logger = logging.getLogger(__name__)


class RewardBootstrap(FollowsDSPyAutolog, Teleprompter):
    """A DSPy teleprompter: ``compile(student, *, trainset, valset=None, teacher=None)`` -> the student with
    reward-gated demos attached to each predictor.

    ``metric``: a DSPy metric ``metric(example, prediction, trace) -> float | bool``. It decides which of the
    teacher's runs become demos (DSPy's rule: truthy, or at least ``metric_threshold`` when given), instead
    of the answer gates of ``config.gates``, and it picks the best candidate on the valset instead of
    ``config.metric``. ``teacher_settings``: ``dspy.context`` settings for the teacher's runs (e.g. a
    stronger ``lm``). ``hints``: whether errors name the Python settings or the command line's flags.
    ``retriever``: the index the executability reward searches;
    by default the one the student searches. ``labeled_plans``: questions with gold decompositions
    (MuSiQue) whose plans join the planner's demo pool when they pass its gate (see
    :func:`~apexdsp.optimizers.demos.labeled_plan_demos`). ``checkpoint``: a file where finished phases
    are kept, so that an interrupted compile rerun with the same settings resumes
    (:class:`~apexdsp.optimizers.checkpoint.CompileCheckpoint`). After ``compile``, ``self.report`` holds a
    :class:`BootstrapReport`. Each ``compile`` is one MLflow run, the child of the active run if there is
    one (in that run's experiment), else a top-level run in ``experiment``: its settings, every candidate's
    scores as it is scored, the chosen candidate and the compile's seconds
    (:mod:`~apexdsp.optimizers.bootstrap_run`).
    """

    def __init__(self, config: BootstrapConfig | None = None, *, metric: Metric | None = None,
                 metric_threshold: float | None = None, retriever: Retriever | None = None,
                 teacher_settings: dict[str, Any] | None = None, labeled_plans: Sequence[Question] | None = None,
                 checkpoint: str | Path | None = None, hints: Literal["python", "cli"] = "python",
                 experiment: str = COMPILE_EXPERIMENT):
        super().__init__()
        self.config = config or BootstrapConfig()
        self.metric = metric
        self.metric_threshold = metric_threshold
        self.hints = hints
        self.retriever = retriever
        self.teacher_settings = dict(teacher_settings or {})
        self.labeled_plans = list(labeled_plans or [])
        self.checkpoint = checkpoint
        self.experiment = experiment
        self.report: BootstrapReport | None = None
        self._run: TrackedRun = UntrackedRun()

    def compile(self, student: dspy.Module, *, trainset: Sequence[dspy.Example | Question],
                valset: Sequence[dspy.Example | Question] | None = None,
                teacher: dspy.Module | None = None) -> dspy.Module:
        train, val = as_examples(trainset), as_examples(valset) if valset else None
        if not train:
            raise ApexError("bootstrap: the trainset is empty")
        retriever = self.retriever or find_retriever(student)
        params = self._run_params(train, val, teacher)
        teacher = (teacher or student).deepcopy()  # the student-as-teacher is a copy: its demos stay its own
        student = student.reset_copy()
        names = _matching_names(student, teacher)
        checkpoint = self._open_checkpoint(student, train, val)
        started = time.perf_counter()
        with bootstrap_run(self.experiment, params) as run:
            self._run = run
            try:
                compiled = self._compile(student, teacher, train, val, names, retriever, checkpoint)
            finally:
                self._run = UntrackedRun()
            log_outcome(run, self.report, time.perf_counter() - started)
        return compiled

    def _compile(self, student: dspy.Module, teacher: dspy.Module, train: list[dspy.Example],
                 val: list[dspy.Example] | None, names: dict[int, str], retriever: Retriever | None,
                 checkpoint: CompileCheckpoint | None) -> dspy.Module:
        started = time.perf_counter()
        if checkpoint is not None and checkpoint.bootstrap is not None:
            pool, rejected, verdicts, errors = checkpoint.load_bootstrap()
            _say(self.config, f"bootstrap: resumed from {checkpoint.path} ({len(verdicts)} traces judged)")
            resumed, reasons = len(verdicts), checkpoint.rejection_reasons()
        else:
            done = checkpoint.teacher_outcomes() if checkpoint is not None else {}
            resumed = len(done)
            pool, rejected, verdicts, errors, reasons = self._bootstrap(teacher, train, names, retriever,
                                                                        checkpoint, done)
            if checkpoint is not None:
                checkpoint.save_bootstrap(pool, rejected, verdicts, errors, reasons)
        bootstrap_seconds = time.perf_counter() - started

        budgets = {name: self.config.demo_budget(signature_name(p)) for name, p in student.named_predictors()}
        demo_sets = build_candidates(pool, budgets, self.config.num_candidates, self.config.seed)
        if not demo_sets:
            raise ApexError("bootstrap: every predictor has a demo budget of 0; nothing to compile")
        started = time.perf_counter()
        scores, programs = self._search(student, demo_sets, val or train, retriever, checkpoint)
        best = self._best(scores, programs)
        selection_seconds = time.perf_counter() - started

        compiled = programs[best.index]
        calibration = None
        if self.config.calibrate_choices:
            # After the demos: they are part of the prompt whose bias the offsets correct.
            calibrator = ChoiceCalibration(CalibrationConfig(threads=self.config.threads,
                                                             progress=self.config.progress))
            compiled = calibrator.compile(compiled, trainset=train)  # the student's LM, not the teacher's
            calibration = calibrator.report
        compiled._compiled = True
        self.report = build_report(train, val or train, verdicts, errors, scores, best, pool, rejected,
                                   demo_sets[best.index] if best.index >= 0 else {}, student,
                                   bootstrap_seconds, selection_seconds)
        self.report.calibration = calibration
        self.report.teacher_resumed = resumed
        self.report.trace_gate, self.report.gates_not_applied = gates_summary(
            self.config.gates, verdicts, train, student, self.metric, self.metric_threshold)
        self.report.rejected_reasons = dict(reasons.most_common())
        for gate, why in self.report.gates_not_applied.items():
            _say(self.config, f"bootstrap: gate not applied: {gate}: {why}")
        _say(self.config, f"chosen: {best.label} ({self._metric_label} {best.metric:.3f} on "
                          f"{len(val or train)} validation questions)")
        return compiled

    def _run_params(self, train: list[dspy.Example], val: list[dspy.Example] | None,
                    teacher: dspy.Module | None) -> dict[str, Any]:
        """What the run records of this compile: the settings, the data's size and digest, the teacher."""
        return {**flat_params(self.get_params()), "trainset_examples": len(train),
                "trainset_sha256": examples_digest(train)[:16], "valset_examples": len(val) if val else 0,
                "valset_sha256": examples_digest(val)[:16] if val else "the trainset",
                "teacher": type(teacher).__name__ if teacher is not None else "the student",
                "teacher_settings": sorted(self.teacher_settings), "labeled_plans": len(self.labeled_plans)}

    @property
    def _metric_label(self) -> str:
        return metric_name(self.metric) if self.metric is not None else self.config.metric

    @property
    def _teacher_hint(self) -> str:
        return "" if self.hints == "cli" else " (compile(..., teacher=) or teacher_settings={'lm': ...})"

    def _hint(self, *settings: str) -> str:
        if self.hints == "cli":
            return ", ".join("--" + name.replace("_", "-") for name in settings)
        return f"BootstrapConfig(gates=DemoGates({', '.join(f'{name}=...' for name in settings)}))"

    def _bootstrap(self, teacher: dspy.Module, train: list[dspy.Example], names: dict[int, str],
                   retriever: Retriever | None, checkpoint: CompileCheckpoint | None,
                   done: Outcomes) -> tuple[dict[str, list[Demo]], Counter, list[TraceVerdict], int, Counter]:
        _say(self.config, f"bootstrap: running the teacher on {len(train) - len(done)} training questions"
                          + (f" ({len(done)} judged before the compile was interrupted)" if done else ""))
        with dspy.context(**self.teacher_settings):
            outcomes = run_teacher(teacher, train, names, self.config.gates, retriever, threads=self.config.threads,
                                   progress=self.config.progress, done=done,
                                   on_outcome=checkpoint.save_teacher_outcomes if checkpoint is not None else None,
                                   metric=self.metric, metric_threshold=self.metric_threshold)
        pool, rejected, verdicts, errors = pooled(outcomes)
        reasons = rejection_reasons(outcomes)
        passed = Counter(v.reason for v in verdicts if v.passed)
        if self.labeled_plans:
            planners = [name for predictor, name in names.items() if _is_planner(predictor, teacher)]
            from apexdsp.programs.planner import Planner

            steps = next((m.max_steps for _, m in teacher.named_sub_modules() if isinstance(m, Planner)), 3)
            labeled, turned_down = labeled_plan_demos(self.labeled_plans, planners, self.config.gates, steps)
            for demo in labeled:
                pool.setdefault(demo.predictor, []).append(demo)
            _say(self.config, f"bootstrap: {len(labeled)} labeled plan demos from gold decompositions "
                              f"({turned_down} of {len(self.labeled_plans)} turned down)")
        _say(self.config, f"bootstrap: {sum(passed.values())} of {len(train)} traces passed "
                          f"({', '.join(f'{n} on {k}' for k, n in passed.items()) or 'none'}); {errors} raised; "
                          f"demos per predictor: {', '.join(f'{k}={len(v)}' for k, v in pool.items()) or 'none'}")
        if not passed:
            failed = Counter(v.reason for v in verdicts)
            if self.metric is not None:
                relax = ("a lower metric_threshold" if self.metric_threshold is not None
                         else f"a metric that accepts more runs than {metric_name(self.metric)}")
            elif self.hints == "cli":
                relax = f"relax the gates ({self._hint('min_answer_f1', 'accept_hit')})"
            else:
                relax = (f"relax the gates ({self._hint('min_answer_f1', 'accept_hit')}), or pass "
                         "RewardBootstrap(metric=...) to judge the runs with your own metric")
            raise ApexError(
                f"bootstrap: no trace of {len(train)} training questions passed the gates "
                f"({'; '.join(f'{n}x {r}' for r, n in failed.most_common(3))}); use more training questions, "
                f"a stronger teacher{self._teacher_hint}, or {relax}")
        if not pool:
            shown = reasons.most_common(3) or sorted(rejected.items())
            raise ApexError(
                f"bootstrap: {sum(passed.values())} traces passed, but no module call passed its own gate "
                f"(rejected: {'; '.join(f'{n}x {r}' for r, n in shown)}); use a stronger teacher{self._teacher_hint}, "
                f"or relax "
                f"{self._hint('min_plan_reward', 'min_final_answer_f1')}")
        return pool, rejected, verdicts, errors, reasons

    def _open_checkpoint(self, student: dspy.Module, train: list[dspy.Example],
                         val: list[dspy.Example] | None) -> CompileCheckpoint | None:
        if self.checkpoint is None:
            return None
        key = fingerprint([n for n, _ in student.named_predictors()],
                          self.config.model_dump(exclude={"threads", "progress"}), examples_digest(train),
                          examples_digest(val or []), examples_digest(self.labeled_plans),
                          getattr(self.metric, "__name__", None),
                          *([self.metric_threshold] if self.metric_threshold is not None else []))
        return CompileCheckpoint(self.checkpoint, key)

    def _search(self, student: dspy.Module, demo_sets: list[dict[str, list[Demo]]], val: list[dspy.Example],
                retriever: Retriever | None,
                checkpoint: CompileCheckpoint | None) -> tuple[list[CandidateScore], dict[int, dspy.Module]]:
        scores: list[CandidateScore] = []
        programs: dict[int, dspy.Module] = {}
        total = len(demo_sets) + self.config.score_zero_shot
        for position, index in enumerate(([-1] if self.config.score_zero_shot else []) + list(range(len(demo_sets)))):
            label = ("zero-shot" if index < 0 else "top-ranked" if index == 0 else f"random #{index}")
            _say(self.config, f"candidate {position + 1}/{total} ({label}) on {len(val)} validation questions")
            self._score(student, demo_sets, index, label, val, retriever, checkpoint, scores, programs)
        best = self._best(scores, programs)
        if best.index >= 0 and self._degenerate(best):
            # Every candidate repeats a demo's answer: try the best one without the demos that carry answers.
            repaired = {name: demos for name, demos in demo_sets[best.index].items()
                        if not any(demo.example.get("answer") for demo in demos)}
            if repaired and repaired not in demo_sets:
                demo_sets.append(repaired)
                label = f"{best.label} without answer demos"
                _say(self.config, f"every candidate copies demo answers; trying {label}")
                self._score(student, demo_sets, len(demo_sets) - 1, label, val, retriever, checkpoint, scores,
                            programs)
        return scores, programs

    def _score(self, student, demo_sets, index, label, val, retriever, checkpoint, scores, programs) -> None:
        program = student.reset_copy() if index < 0 else with_demos(student, demo_sets[index])
        done = checkpoint.candidate(index) if checkpoint is not None else None
        if done is not None:
            score = CandidateScore(**done)
        else:
            score = score_candidate(program, val, config=self.config, retriever=retriever, metric=self.metric,
                                    index=index, label=label)
            if checkpoint is not None:
                checkpoint.save_candidate(index, score.__dict__)
        log_candidate(self._run, score)
        _say(self.config, f"  {label}: {self._metric_label} {score.metric:.3f}, F1 {score.f1:.3f}, "
                          f"decomposition {_fmt(score.decomposition)}, copied demo answers {score.copy_rate:.2f}, "
                          f"{score.seconds:.0f}s")
        if index >= 0 or self.config.allow_zero_shot:
            programs[index] = program
        scores.append(score)

    def _degenerate(self, score: CandidateScore) -> bool:
        return score.copy_rate > self.config.max_copy_rate

    def _best(self, scores: list[CandidateScore], programs: dict[int, dspy.Module]) -> CandidateScore:
        """The best eligible candidate (the zero-shot program is scored as the reference; it competes only
        with ``allow_zero_shot``); ``max`` keeps the first of equals."""
        return max((s for s in scores if s.index in programs), key=lambda s: s.key(self.config))

    def get_params(self) -> dict[str, Any]:
        return {"config": self.config.model_dump(), "metric": getattr(self.metric, "__name__", None),
                "metric_threshold": self.metric_threshold}


def find_retriever(program: dspy.Module) -> Retriever | None:
    """The index a program searches (the first module holding one), for the executability reward."""
    for _, module in [("", program), *program.named_sub_modules()]:
        held = getattr(module, "_retriever", None)
        if isinstance(held, Shared) and held.value is not None:
            return held.value
        if hasattr(module, "search_batch"):
            return module  # type: ignore[return-value]
    return None


def _is_planner(predictor_id: int, program: dspy.Module) -> bool:
    from apexdsp.programs.planner import WritePlan

    return any(id(p) == predictor_id and signature_name(p) == WritePlan.__name__ for _, p in program.named_predictors())


def _matching_names(student: dspy.Module, teacher: dspy.Module) -> dict[int, str]:
    """The teacher's predictors by identity -> name; the two programs must have the same predictors."""
    student_names = [name for name, _ in student.named_predictors()]
    teacher_named = teacher.named_predictors()
    if not student_names:
        raise ApexError(f"bootstrap: {type(student).__name__} has no dspy.Predict modules to give demos to")
    if student_names != [name for name, _ in teacher_named]:
        raise ApexError(f"bootstrap: the teacher's predictors {[n for n, _ in teacher_named]} differ from the "
                        f"student's {student_names}")
    return {id(predictor): name for name, predictor in teacher_named}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _say(config: BootstrapConfig, message: str) -> None:
    logger.info(message)
    if config.progress:
        print(message, file=sys.stderr, flush=True)


__all__ = ["BootstrapReport", "DemoStats", "RewardBootstrap", "as_examples", "find_retriever"]
