"""Executor, search recording and evaluation figures on paths that need no LM call (real BM25 search)."""

from __future__ import annotations

import dspy
import pytest

from apexdsp.data.records import Passage, Question
from apexdsp.evaluation import aggregate, score_question
from apexdsp.programs.evidence import evidence_pool, format_passages, search_many
from apexdsp.programs.executor import Executor
from apexdsp.programs.planner import parse_plan
from apexdsp.programs.trajectory import Trajectory

PASSAGES = [
    Passage(id="jaws", title="Jaws (film)", text="Jaws is a 1975 American thriller film directed by Steven Spielberg."),
    Passage(id="spielberg", title="Steven Spielberg", text="Steven Spielberg (born December 18, 1946) is an "
                                                           "American filmmaker."),
    Passage(id="paris", title="Paris", text="Paris is the capital and most populous city of France."),
]


@pytest.fixture(scope="module")
def bm25():
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import Corpus

    return BM25Retriever(Corpus(passages=PASSAGES))


class Silent:
    name = "silent"

    def search(self, query, k=5):
        return []

    def search_batch(self, queries, k=5):
        return [[] for _ in queries]


class Broken(Silent):
    def search_batch(self, queries, k=5):
        raise RuntimeError("searcher crashed")


def test_search_many_records_every_hit_with_its_query_round_and_step(bm25):
    trajectory = Trajectory(program="t", question="q")
    results = search_many(bm25, ["Jaws thriller film", "capital of France", "  "], 2, trajectory, round=1, step=3)
    assert [hit.pid for hit in results[0]][0] == "jaws" and results[1][0].pid == "paris" and results[2] == []
    assert trajectory.queries == ["Jaws thriller film", "capital of France"]  # the blank one is skipped, noted
    assert trajectory.notes == ["1 blank search queries skipped"]
    assert {(p.query, p.round, p.step) for p in trajectory.retrieved} >= {("capital of France", 1, 3)}
    pool = evidence_pool(trajectory, limit=2)
    assert {p.pid for p in pool} == {"jaws", "paris"}  # each query's best passage comes first
    assert format_passages(pool[:1], max_chars=20).startswith("[1] ")


def test_a_crashing_retriever_costs_the_search_not_the_question():
    trajectory = Trajectory(program="t", question="q")
    assert search_many(Broken(), ["a query"], 5, trajectory) == [[]]
    assert trajectory.errors == ["search failed: RuntimeError: searcher crashed"]


def test_executor_without_hits_records_unanswered_steps_and_unfilled_placeholders():
    """No passages and no LM-written queries: the executor needs no LM call and still records everything."""
    plan = parse_plan("1. Who directed Jaws?\n2. When was #1 born?", "q").plan
    trajectory = Trajectory(program="t", question="q")
    with dspy.context(lm=None):
        Executor(Silent(), max_rewrites=0, write_queries=False)(steps=plan.steps, trajectory=trajectory)
    first, second = trajectory.subgoals
    assert not first.answered and first.answer == "" and first.analysis == "no passages retrieved"
    assert second.unfilled == [1]
    assert second.filled == "When was (the answer to: Who directed Jaws) born?"
    assert second.queries == [second.filled]


def question() -> Question:
    return Question(id="q1", question="When was the director of Jaws born?", answer="December 18, 1946",
                    supporting_titles=["Jaws (film)", "Steven Spielberg"])


def test_evaluation_counts_planner_fallbacks_and_repairs():
    ok = Trajectory(program="apex", question="q")
    ok.plans.append(parse_plan("1. Who directed Jaws?\n2. When was #1 born?", "q").plan.to_record())
    broken = Trajectory(program="apex", question="q")
    parsed = parse_plan("The answer is:", "q")
    broken.plans.append(parsed.plan.to_record(issues=parsed.issues, fallback=parsed.fallback))
    repaired = Trajectory(program="apex", question="q")
    parsed = parse_plan("1. When was #2 born?\n2. Who directed Jaws?", "q")
    repaired.plans.append(parsed.plan.to_record(issues=parsed.issues))
    rows = [score_question(question(), dspy.Prediction(answer="", trajectory=t), retrieves=True)
            for t in (ok, broken, repaired)]
    assert [(r.plans, r.plan_fallbacks, r.plan_repairs) for r in rows] == [(1, 0, 0), (1, 1, 1), (1, 0, 1)]
    report = aggregate(rows, seconds=3.0, retrieves=True)
    assert report.plan_fallback_rate == pytest.approx(1 / 3) and report.plan_repair_rate == pytest.approx(2 / 3)
    assert aggregate(rows[:0], 1.0, retrieves=True).plan_fallback_rate is None


def test_hit_and_recall_are_measured_on_what_the_program_retrieved(bm25):
    trajectory = Trajectory(program="rag", question=question().question)
    search_many(bm25, ["Jaws film director", "Steven Spielberg born"], 1, trajectory)
    row = score_question(question(), dspy.Prediction(answer="1946", trajectory=trajectory), retrieves=True)
    assert row.recall == 1.0 and row.hit == 1.0 and row.em == 0.0 and row.f1 > 0



def test_ask_options_parse_as_json_values_and_bad_input_is_a_user_error():
    from apexdsp.cli.ask_cmd import ask, parse_options
    from apexdsp.errors import ApexError

    assert parse_options(["k=3", "write_queries=false", "frozen_generator=smollm2-135m"]) == {
        "k": 3, "write_queries": False, "frozen_generator": "smollm2-135m"}
    with pytest.raises(ApexError, match="KEY=VALUE"):
        parse_options(["k"])
    with pytest.raises(ApexError, match="unknown program 'nope'"):
        ask("who?", program="nope", index=None, lm="smollm2-135m", option=None, as_json=True)
    with pytest.raises(ApexError, match="--index"):
        ask("who?", program="apex", index=None, lm="smollm2-135m", option=None, as_json=True)


def test_a_misspelt_program_option_is_a_user_error():
    from apexdsp.errors import ApexError
    from apexdsp.programs.registry import build_program

    with pytest.raises(ApexError, match="max_stepz"):
        build_program("apex", retriever=Silent(), max_stepz=2)
    with pytest.raises(ApexError, match="k"):
        build_program("rag", retriever=Silent(), k=0)


def test_copies_of_a_program_share_the_index_but_not_the_learnable_state(bm25):
    """Optimizers copy programs per candidate: demos must be copied, the index must not."""
    from apexdsp.programs.registry import build_program

    program = build_program("apex", retriever=bm25)
    program.planner.write_plan.demos = [dspy.Example(question="q", plan="1. a b?")]
    for copy in (program.deepcopy(), program.reset_copy()):
        assert copy.executor.retriever is bm25
        assert copy.planner.write_plan is not program.planner.write_plan
    assert program.deepcopy().planner.write_plan.demos == program.planner.write_plan.demos
    assert program.reset_copy().planner.write_plan.demos == []
