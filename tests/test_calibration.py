"""Choice calibration: the pure fitting functions, the saved offsets, and a real fit with a local model."""

from __future__ import annotations

from typing import Literal

import dspy
import pytest

from apexdsp.lm.adapter import CHOICE_BIAS, TolerantChatAdapter
from apexdsp.lm.registry import get_lm
from apexdsp.optimizers.calibration import (CalibrationConfig, ChoiceCalibration, fit_offset, flip_point, gold_choice,
                                            heldout_correct)
from apexdsp.programs.choice import ChoicePredict


class YesNo(dspy.Signature):
    """Answer the yes/no question."""

    question: str = dspy.InputField()
    answer: Literal["yes", "no"] = dspy.OutputField()


class Decider(dspy.Module):
    def __init__(self):
        super().__init__()
        self.decide = ChoicePredict(YesNo, max_tokens=4)

    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(answer=self.decide(question=question).answer)


def test_the_gold_choice_is_the_choice_or_the_option_the_answer_names():
    assert gold_choice({}, ("yes", "no"), ["No"]) == "no"
    options = {"options": "A) Arthur's Magazine\nB) First for Women"}
    assert gold_choice(options, ("A", "B"), ["first for women"]) == "B"
    assert gold_choice(options, ("A", "B"), ["Arthur's Magazine"]) == "A"
    assert gold_choice(options, ("A", "B"), ["1844"]) is None  # the answer is neither option
    assert gold_choice({"options": "A) Paris\nB) Paris"}, ("A", "B"), ["Paris"]) is None  # both: ambiguous
    assert gold_choice({}, ("A", "B"), ["B"]) == "B"


def test_the_flip_point_is_found_by_bisection_within_its_resolution():
    for true_flip in (-7.3, -0.4, 0.6, 2.3, 9.1):
        found = flip_point(lambda offset, t=true_flip: offset > t, bias_range=10.0, steps=8)
        assert abs(found - true_flip) <= 10.0 / 2 ** 8
    assert flip_point(lambda offset: True, 10.0, 4) == -10.0  # prefers the second choice at any offset
    assert flip_point(lambda offset: False, 10.0, 4) == 10.0


def test_the_offset_answers_the_most_calls_right_and_stays_at_zero_without_evidence():
    # The model leans to the first choice (every flip point above 0) but leans less where the second is right.
    offset, correct = fit_offset([3.0, 3.5, 1.0, 1.5], [False, False, True, True])
    assert 1.5 < offset < 3.0 and correct == 4
    # Already right at 0: no offset.
    assert fit_offset([-1.0, 2.0], [True, False]) == (0.0, 2)
    # No signal: the fit learns the majority choice, and that is all it can do.
    offset, correct = fit_offset([2.0, 2.1, 2.2], [True, False, True])
    assert correct == 2 and offset == pytest.approx(2.05)  # two of three, as "always the second" would
    with pytest.raises(ValueError, match="2 flip points but 1 labels"):
        fit_offset([0.0, 1.0], [True])


def test_the_held_out_check_keeps_an_offset_that_generalises_and_refuses_one_that_only_fits():
    # Signal: the model leans to the first choice everywhere, less where the second is right.
    flips = [3.0, 1.0, 3.2, 1.2, 2.9, 0.9, 3.1, 1.1, 3.3, 1.3]
    labels = [False, True] * 5
    raw, fitted = heldout_correct(flips, labels, folds=5)
    assert (raw, fitted) == (5, 10)  # no offset: the first choice always; fitted on 4 folds: every call right
    # No signal: the same flip point whatever the gold choice. In-sample an offset still "helps" (it learns
    # the majority, 4 -> 6 of 10), but fitted without a call it never beats no offset on that call.
    noise = [2.0] * 10
    coin = [True, False, True, True, False, True, False, True, False, True]
    assert fit_offset(noise, coin)[1] == 6 > sum(not label for label in coin)
    assert heldout_correct(noise, coin, folds=5) == (4, 2)  # held out it loses: the offset is refused
    with pytest.raises(ValueError, match="at least 2 folds"):
        heldout_correct(flips, labels, folds=1)
    with pytest.raises(ValueError, match="heldout_folds must be 0"):
        CalibrationConfig(heldout_folds=1)


def test_offsets_are_part_of_the_saved_state_and_old_states_load_without_them():
    predictor = ChoicePredict(YesNo)
    predictor.choice_bias = {"no": 1.25}
    state = predictor.dump_state()
    assert state[CHOICE_BIAS] == {"no": 1.25}
    assert ChoicePredict(YesNo).load_state(state).choice_bias == {"no": 1.25}
    old = {k: v for k, v in state.items() if k != CHOICE_BIAS}
    assert ChoicePredict(YesNo).load_state(old).choice_bias == {}
    predictor.reset()
    assert predictor.choice_bias == {}


def test_an_offset_moves_a_local_models_constrained_choice(tiny_model_dir):
    lm = get_lm(str(tiny_model_dir), max_tokens=16)
    predictor = ChoicePredict(YesNo)
    questions = [f"Is {n} a prime number?" for n in range(6)]
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        predictor.choice_bias = {"no": 50.0}
        assert {predictor(question=q).answer for q in questions} == {"no"}
        predictor.choice_bias = {"no": -50.0}
        assert {predictor(question=q).answer for q in questions} == {"yes"}
        # the offset never reaches the LM as a setting of its own
        assert all(CHOICE_BIAS not in (entry.get("kwargs") or {}) for entry in lm.history)


def test_calibration_fits_an_offset_at_least_as_good_as_raw_and_majority(tiny_model_dir, tmp_path):
    from apexdsp.optimizers.compiled import load_compiled, save_compiled

    lm = get_lm(str(tiny_model_dir), max_tokens=16)
    trainset = [dspy.Example(question=f"Is {n} larger than {n % 3}?", answer="yes" if n % 3 else "no")
                .with_inputs("question") for n in range(12)]
    trainset.append(dspy.Example(question="Who wrote Hamlet?", answer="Shakespeare").with_inputs("question"))
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        calibration = ChoiceCalibration(CalibrationConfig(min_calls=4, threads=1, progress=False,
                                                            heldout_folds=0))  # the in-sample fit
        compiled = calibration.compile(Decider(), trainset=trainset)
    report = calibration.report
    assert report.train_questions == 12  # the open question never reaches a choice step
    (fit,) = report.predictors
    assert fit.predictor == "decide" and fit.calls == 12 and fit.skipped is None
    assert fit.calibrated_correct >= max(fit.raw_correct, fit.majority_correct)
    assert compiled.decide.choice_bias == ({"no": fit.offset} if fit.offset else {})
    save_compiled(compiled, tmp_path / "compiled", lm=str(tiny_model_dir))
    loaded = load_compiled(tmp_path / "compiled", program=Decider())
    assert loaded.program.decide.choice_bias == compiled.decide.choice_bias


def test_by_default_an_offset_is_kept_only_if_it_helps_held_out_calls(tiny_model_dir):
    lm = get_lm(str(tiny_model_dir), max_tokens=16)
    trainset = [dspy.Example(question=f"Is {n} larger than {n % 3}?", answer="yes" if n % 3 else "no")
                .with_inputs("question") for n in range(12)]
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        calibration = ChoiceCalibration(CalibrationConfig(min_calls=4, threads=1, progress=False))
        compiled = calibration.compile(Decider(), trainset=trainset)
    (fit,) = calibration.report.predictors
    if fit.heldout_raw_correct is None:  # the in-sample fit already chose no offset: nothing to check
        assert fit.offset == 0 and compiled.decide.choice_bias == {}
    elif fit.skipped:
        assert "held-out" in fit.skipped and fit.offset == 0 and compiled.decide.choice_bias == {}
        assert fit.heldout_calibrated_correct <= fit.heldout_raw_correct
        assert fit.calibrated_correct == fit.raw_correct
    else:
        assert fit.heldout_calibrated_correct > fit.heldout_raw_correct
        assert compiled.decide.choice_bias == {"no": fit.offset}


def test_calibration_leaves_a_program_without_choice_steps_alone():
    class Open(dspy.Module):
        def __init__(self):
            super().__init__()
            self.answer = dspy.Predict("question -> answer")

    calibration = ChoiceCalibration(CalibrationConfig(progress=False))
    calibration.compile(Open(), trainset=[dspy.Example(question="Is it?", answer="yes").with_inputs("question")])
    assert calibration.report.skipped == "no two-choice predictor"


def test_calibrate_is_a_stage_of_the_compile_command_and_of_specs(tmp_path):
    from pathlib import Path

    from apexdsp.cli.compile_cmd import weight_stages
    from apexdsp.experiments.stages import STAGE_KINDS

    (stage,) = weight_stages("calibrate", 1, 0.0, start_from=Path("compiled/apex"))
    assert (stage.kind, stage.module) == ("calibrate", "choices")
    assert [s.kind for s in weight_stages("bootstrap+calibrate+grpo(planner)", 1, 0.0)] == ["calibrate", "grpo"]
    STAGE_KINDS["calibrate"].check_settings({"bisection_steps": 4})
    with pytest.raises(ValueError, match="bisection_step"):
        STAGE_KINDS["calibrate"].check_settings({"bisection_step": 4})
