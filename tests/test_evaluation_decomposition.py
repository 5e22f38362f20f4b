"""``decomposition_summary``: an evaluation's plans scored with the same reward the optimizers use.

Hand-made result rows over real HotpotQA questions and a real BM25 index of their paragraphs: the summary
must equal the reward computed plan by plan, leave out rows that never planned, and be empty for a program
that does not plan.
"""

from __future__ import annotations

import statistics

import pytest

from apexdsp.data.loaders import read_questions
from apexdsp.evaluation import QuestionResult, decomposition_summary
from apexdsp.programs.planner import parse_plan
from apexdsp.programs.trajectory import Trajectory
from apexdsp.rewards import decomposition_rewards
from test_rewards import COLLIER_GOOD, bm25_over


@pytest.fixture(scope="module")
def questions(data_dir):
    return read_questions(data_dir / "hotpotqa" / "dev.jsonl", limit=4)


def row(question, plan_text: str | None) -> QuestionResult:
    """A result row whose trajectory holds the planner plan parsed from ``plan_text`` (none if ``None``)."""
    trajectory = Trajectory(program="opera" if plan_text is not None else "rag", question=question.question)
    if plan_text is not None:
        parsed = parse_plan(plan_text, question.question)
        trajectory.plans.append(parsed.plan.to_record(issues=parsed.issues, fallback=parsed.fallback))
    return QuestionResult(id=question.id, question=question.question, gold=question.answer, prediction="",
                          em=0.0, f1=0.0, plans=int(plan_text is not None), trajectory=trajectory.model_dump())


def test_summary_is_the_mean_reward_of_the_rows_that_planned(questions):
    retriever = bm25_over(questions)
    collier, tisdale = questions[3], questions[0]
    rows = [row(collier, COLLIER_GOOD), row(tisdale, "no plan here"), row(questions[1], None)]
    summary = decomposition_summary(rows, questions, retriever)
    expected = decomposition_rewards([collier, tisdale], [COLLIER_GOOD, "no plan here"], retriever=retriever)
    assert summary["decomposition_planned"] == 2  # the row without a plan is left out
    assert summary["decomposition"] == pytest.approx(statistics.fmean(r.value for r in expected))
    searched = [r.components["executability"] for r in expected if "executability" in r.components]
    assert searched and summary["decomposition_executability"] == pytest.approx(statistics.fmean(searched))
    assert expected[0].value > expected[1].value  # the chained plan beats the unparseable one


def test_no_planner_means_no_decomposition_figures(questions):
    assert decomposition_summary([row(q, None) for q in questions], questions, bm25_over(questions)) == {}


def test_without_an_index_executability_is_left_out(questions):
    summary = decomposition_summary([row(questions[3], COLLIER_GOOD)], questions, None)
    assert "decomposition_executability" not in summary and 0 < summary["decomposition"] <= 1
