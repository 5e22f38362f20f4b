"""Choice calibration: fit each closed-answer predictor's preference between its two choices on training data.

    trainset (closed-form questions) --run the program, traced--> the calls of each two-choice predictor
    calls with a gold choice --bisection on a logit offset--> the offset at which each call flips
    flip points, gold choices --fit--> the offset that answers the most training calls right
    the same fit, k-fold --> kept only if offsets fitted without a call beat no offset on it

A 135M model asked "A or B?" answers "A" whatever the passages say (41 of 42 HotpotQA dev questions), and
yes/no by a constant. The raw argmax mixes what the model read with a bias of the prompt form. Contextual
calibration (Zhao et al., 2021) removes that bias with an offset estimated from data; here the offset is
fitted on the training questions whose gold answer is one of the choices, as a compile step, and saved
with the program (:class:`apexdsp.programs.choice.ChoicePredict`). The offset is the only parameter; the
report says how many training calls it turns right and how that compares with always answering the
majority choice, which is what an offset learns when the model's preference carries no signal. An
in-sample fit always looks at least as good as no offset, so the offset is kept only when it also helps
calls it was not fitted on (k-fold: each call scored by the offset fitted on the other folds).

The flip point of a call is found with the backend's own knob (a logit bias on the choice token), by
bisection, so no log-probability API is needed: a call answers the second choice exactly when the offset
exceeds its flip point.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import dspy
from dspy.teleprompt.teleprompt import Teleprompter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from apexdsp.data.examples import as_examples
from apexdsp.lm.adapter import CHOICE_BIAS, prefills
from apexdsp.metrics.answer import normalize_answer
from apexdsp.programs.choice import ChoicePredict, choice_values
from apexdsp.programs.question_forms import choice_options, is_yes_no_question, parse_options
from apexdsp.tracking.dspy_autolog import FollowsDSPyAutolog

logger = logging.getLogger(__name__)


class CalibrationConfig(BaseModel):
    """How flip points are searched and when an offset is trusted."""

    model_config = ConfigDict(extra="forbid")

    bias_range: float = Field(10.0, gt=0, description="flip points are searched in [-range, range] (logits)")
    bisection_steps: int = Field(6, ge=1, description="halvings after the probe at 0 (resolution range / 2**steps)")
    min_calls: int = Field(8, ge=1, description="fewer labeled calls: the predictor is left as it is")
    heldout_folds: int = Field(5, ge=0, description=(
        "k >= 2: keep the offset only if offsets fitted on k-1 folds of the calls answer the calls left out "
        "better than no offset; 0 trusts the in-sample fit"))
    closed_form_only: bool = Field(True, description=(
        "run the program only on yes/no and 'X or Y' questions (the only ones that reach the choice steps)"))
    threads: int = Field(8, ge=1, description="concurrent calls (the LM batches them)")
    progress: bool = Field(True, description="show progress bars")

    @field_validator("heldout_folds")
    @classmethod
    def _folds(cls, value: int) -> int:
        if value == 1:
            raise ValueError("heldout_folds must be 0 (no held-out check) or at least 2")
        return value


class PredictorCalibration(BaseModel):
    """One predictor's fit, on its labeled training calls."""

    predictor: str
    choices: list[str]
    calls: int  # labeled calls (gold answer is one of the choices)
    offset: float  # added to the second choice's logit
    raw_correct: int  # right at offset 0 (the uncalibrated predictor)
    calibrated_correct: int
    majority_correct: int  # right by always answering the more frequent gold choice
    second_share_raw: float  # share of calls answered with the second choice, before and after
    second_share_calibrated: float
    heldout_raw_correct: int | None = None  # k-fold: right with no offset ...
    heldout_calibrated_correct: int | None = None  # ... and with the offset fitted on the other folds
    skipped: str | None = None  # why no offset was set


class CalibrationReport(BaseModel):
    train_questions: int
    program_errors: int
    predictors: list[PredictorCalibration]
    skipped: str | None = None


def gold_choice(inputs: dict[str, Any], choices: Sequence[str], answers: Sequence[str]) -> str | None:
    """The choice a call should answer, or ``None`` when the gold answer names none (or several).

    A choice that *is* the answer (``yes``/``no``) wins; else the options listed in the call's ``options``
    input (``A) X`` / ``B) Y``) are matched against the answers, and the matching option's letter is the
    gold choice.
    """
    gold = {normalize_answer(a) for a in answers if a}
    direct = [c for c in choices if normalize_answer(c) in gold]
    if direct:
        return direct[0] if len(direct) == 1 else None
    options = parse_options(inputs.get("options"))
    if options is None or len(options) != len(choices):
        return None
    matched = [choice for choice, option in zip(choices, options) if normalize_answer(option) in gold]
    return matched[0] if len(matched) == 1 else None


def flip_point(prefers_second: Callable[[float], bool], bias_range: float, steps: int) -> float:
    """The offset at which a call switches from the first choice to the second (clamped to the range).

    ``prefers_second(offset)`` asks the model with ``offset`` added to the second choice's logit; the answer
    is assumed monotone in the offset. One probe at 0, then bisection towards the side the flip is on.
    """
    if prefers_second(0.0):
        low, high = -bias_range, 0.0
        if prefers_second(low):
            return low
    else:
        low, high = 0.0, bias_range
        if not prefers_second(high):
            return high
    for _ in range(steps):
        middle = (low + high) / 2
        if prefers_second(middle):
            high = middle
        else:
            low = middle
    return (low + high) / 2


def fit_offset(flips: Sequence[float], second_is_gold: Sequence[bool]) -> tuple[float, int]:
    """The offset answering the most calls right (a call answers the second choice when offset > its flip
    point), and that count; among equals the offset nearest 0, so no evidence means no change."""
    if len(flips) != len(second_is_gold):
        raise ValueError(f"{len(flips)} flip points but {len(second_is_gold)} labels")
    points = sorted(set(flips))
    candidates = {0.0, points[0] - 1.0, points[-1] + 1.0} if points else {0.0}
    candidates.update((a + b) / 2 for a, b in zip(points, points[1:]))

    def correct(offset: float) -> int:
        return sum((offset > flip) == second for flip, second in zip(flips, second_is_gold))

    best = max(candidates, key=lambda offset: (correct(offset), -abs(offset)))
    return best, correct(best)


def heldout_correct(flips: Sequence[float], second_is_gold: Sequence[bool], folds: int) -> tuple[int, int]:
    """(right with no offset, right with the offset fitted on the other folds), summed over ``folds``
    interleaved folds: every call is scored once, by an offset fitted without it."""
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    raw = fitted = 0
    for fold in range(folds):
        train = [(f, s) for i, (f, s) in enumerate(zip(flips, second_is_gold, strict=True)) if i % folds != fold]
        test = [(f, s) for i, (f, s) in enumerate(zip(flips, second_is_gold, strict=True)) if i % folds == fold]
        offset = fit_offset([f for f, _ in train], [s for _, s in train])[0] if train else 0.0
        raw += sum((0.0 > f) == s for f, s in test)
        fitted += sum((offset > f) == s for f, s in test)
    return raw, fitted


class ChoiceCalibration(FollowsDSPyAutolog, Teleprompter):
    """A DSPy teleprompter: ``compile(student, *, trainset)`` -> a copy whose two-choice
    :class:`~apexdsp.programs.choice.ChoicePredict` steps carry fitted offsets; ``self.report`` says what
    each fit did."""

    def __init__(self, config: CalibrationConfig | None = None):
        super().__init__()
        self.config = config or CalibrationConfig()
        self.report: CalibrationReport | None = None

    def compile(self, student: dspy.Module, *, trainset: Sequence[Any], valset: Any = None,
                teacher: Any = None) -> dspy.Module:
        program = student.deepcopy()
        targets = {name: p for name, p in program.named_predictors()
                   if isinstance(p, ChoicePredict) and len(choice_values(p)) == 2}
        examples = [e for e in as_examples(trainset)
                    if not self.config.closed_form_only or _closed_form(str(e.get("question", "")))]
        if not targets or not examples or not prefills(dspy.settings.lm):
            reason = ("no two-choice predictor" if not targets else "no closed-form training question"
                      if not examples else "the LM is not a local engine (offsets steer its constrained token)")
            self.report = CalibrationReport(train_questions=len(examples), program_errors=0, predictors=[],
                                            skipped=reason)
            self._say(f"choice calibration skipped: {reason}")
            return program
        for predictor in targets.values():
            predictor.choice_bias = {}  # flip points are measured on the raw preference
        calls, errors = self._labeled_calls(program, examples, targets)
        fits = [self._fit(name, targets[name], calls.get(name, [])) for name in targets]
        self.report = CalibrationReport(train_questions=len(examples), program_errors=errors, predictors=fits)
        return program

    def _labeled_calls(self, program: dspy.Module, examples: list[dspy.Example],
                       targets: dict[str, ChoicePredict]) -> tuple[dict[str, list[tuple[dict, bool]]], int]:
        """Per predictor, the inputs of each training call whose gold choice is known, with whether the gold
        choice is the second."""
        from apexdsp.optimizers.rollouts import run_traced

        self._say(f"choice calibration: running the program on {len(examples)} closed-form training questions")
        rollouts = run_traced(program, examples, threads=self.config.threads, progress=self.config.progress)
        names = {id(p): name for name, p in targets.items()}
        calls: dict[str, list[tuple[dict, bool]]] = {}
        for rollout in rollouts:
            answers = [rollout.question.answer, *rollout.question.answer_aliases]
            for predictor, inputs, _ in rollout.trace:
                name = names.get(id(predictor))
                if name is None:
                    continue
                choices = choice_values(predictor)
                gold = gold_choice(inputs, choices, answers)
                if gold is not None:
                    calls.setdefault(name, []).append((dict(inputs), gold == choices[1]))
        return calls, sum(r.error is not None for r in rollouts)

    def _fit(self, name: str, predictor: ChoicePredict, calls: list[tuple[dict, bool]]) -> PredictorCalibration:
        choices = list(choice_values(predictor))
        if len(calls) < self.config.min_calls:
            self._say(f"choice calibration: {name}: {len(calls)} labeled calls (< {self.config.min_calls}); unchanged")
            return _unchanged(name, choices, len(calls), f"{len(calls)} labeled calls")
        measured = self._flip_points(predictor, choices[1], [inputs for inputs, _ in calls], name)
        kept = [(flip, second) for flip, (_, second) in zip(measured, calls) if flip is not None]  # None: raised
        flips, labels = [flip for flip, _ in kept], [second for _, second in kept]
        if not flips:
            return _unchanged(name, choices, 0, "every probe call raised")
        offset, correct = fit_offset(flips, labels)
        offset = round(offset, 3)
        raw_correct = sum((0.0 > f) == s for f, s in zip(flips, labels))
        heldout, skipped = (None, None), None
        if offset and self.config.heldout_folds and len(flips) >= self.config.heldout_folds:
            heldout = heldout_correct(flips, labels, self.config.heldout_folds)
            if heldout[1] <= heldout[0]:
                skipped = (f"the offset did not help held-out calls ({heldout[1]} vs {heldout[0]} of {len(flips)} "
                           f"right, {self.config.heldout_folds}-fold); in-sample it would have set {offset:+.2f}")
                offset, correct = 0.0, raw_correct
        if offset:
            predictor.choice_bias = {choices[1]: offset}
        seconds = sum(labels)
        fit = PredictorCalibration(
            predictor=name, choices=choices, calls=len(labels), offset=offset,
            raw_correct=raw_correct, calibrated_correct=correct,
            majority_correct=max(seconds, len(labels) - seconds),
            second_share_raw=sum(0.0 > f for f in flips) / len(flips),
            second_share_calibrated=sum(offset > f for f in flips) / len(flips),
            heldout_raw_correct=heldout[0], heldout_calibrated_correct=heldout[1], skipped=skipped)
        if skipped:
            self._say(f"choice calibration: {name}: unchanged: {skipped}")
            return fit
        self._say(f"choice calibration: {name}: offset {offset:+.2f} on {choices[1]!r}; right on {fit.raw_correct} -> "
                  f"{correct} of {len(labels)} training calls (majority choice: {fit.majority_correct})")
        return fit

    def _flip_points(self, predictor: ChoicePredict, second: str, inputs: list[dict],
                     name: str) -> list[float | None]:
        from dspy.utils.parallelizer import ParallelExecutor

        def flip(index: int) -> float:
            def prefers_second(offset: float) -> bool:
                with dspy.context(trace=[]):
                    reply = predictor(**inputs[index], config={CHOICE_BIAS: {second: offset}}).answer
                return str(reply) == second

            return flip_point(prefers_second, self.config.bias_range, self.config.bisection_steps)

        self._say(f"choice calibration: {name}: flip points of {len(inputs)} calls")
        executor = ParallelExecutor(num_threads=self.config.threads, max_errors=len(inputs) + 1,
                                    disable_progress_bar=not self.config.progress, provide_traceback=False, timeout=0)
        return executor.execute(flip, list(range(len(inputs))))

    def _say(self, message: str) -> None:
        logger.info(message)
        if self.config.progress:
            print(message, file=sys.stderr, flush=True)

    def get_params(self) -> dict[str, Any]:
        return {"config": self.config.model_dump()}


def _unchanged(name: str, choices: list[str], calls: int, reason: str) -> PredictorCalibration:
    """The report of a predictor left without an offset, and why."""
    return PredictorCalibration(predictor=name, choices=choices, calls=calls, offset=0.0, raw_correct=0,
                                calibrated_correct=0, majority_correct=0, second_share_raw=0.0,
                                second_share_calibrated=0.0, skipped=reason)


def _closed_form(question: str) -> bool:
    return choice_options(question) is not None or is_yes_no_question(question)


__all__ = ["CalibrationConfig", "CalibrationReport", "ChoiceCalibration", "PredictorCalibration", "fit_offset",
           "flip_point", "gold_choice"]
