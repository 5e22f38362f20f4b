"""The search agents end to end: real SmolLM2-135M, real BM25 search over real HotpotQA paragraphs.

Budgets are cut down (two sub-goals, no second round) so the whole file stays around a minute or two;
the assertions are about the contract every program keeps: an answer string, a populated trajectory,
counted usage, and no exception for bad input or a broken retriever.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from typer.testing import CliRunner

from apexdsp.data.loaders import read_questions
from apexdsp.data.records import Passage
from apexdsp.indexes.base import SearchHit
from apexdsp.programs.registry import build_program
from apexdsp.programs.trajectory import Trajectory

pytestmark = pytest.mark.slow

SMALL = {
    "rag": {},
    "opera": {"max_steps": 2, "max_rewrites": 1},
    "apex": {"max_steps": 2, "max_rewrites": 0, "max_reflections": 1, "max_follow_ups": 1},
    "qagent": {"max_rounds": 2, "max_queries": 2, "max_follow_ups": 1},
}


@pytest.fixture(scope="module")
def questions(data_dir):
    return read_questions(data_dir / "hotpotqa" / "dev.jsonl", limit=3)


@pytest.fixture(scope="module")
def retriever(questions):
    """BM25 over the 30 real paragraphs of the first three dev questions (gold and distractors)."""
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import Corpus

    passages = {}
    for question in questions:
        for paragraph in question.paragraphs:
            passages.setdefault(paragraph.title, Passage(id=f"p{len(passages)}", title=paragraph.title,
                                                         text=paragraph.text))
    return BM25Retriever(Corpus(passages=list(passages.values())))


@pytest.fixture(scope="module")
def lm():
    from apexdsp.runtime import configure_dspy

    return configure_dspy("smollm2-135m")


class SilentRetriever:
    """A retriever whose index has nothing for any query."""

    name = "silent"

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        return []

    def search_batch(self, queries: list[str], k: int = 5) -> list[list[SearchHit]]:
        return [[] for _ in queries]


class BrokenRetriever(SilentRetriever):
    """A retriever whose backend fails (a corrupt index, a lost file)."""

    name = "broken"

    def search_batch(self, queries: list[str], k: int = 5) -> list[list[SearchHit]]:
        raise OSError("index file vanished")


def check_contract(prediction, program: str) -> Trajectory:
    assert isinstance(prediction.answer, str)
    trajectory = prediction.trajectory
    assert isinstance(trajectory, Trajectory) and trajectory.program == program
    assert trajectory.answer == prediction.answer
    assert trajectory.usage.calls >= 1 and trajectory.usage.prompt_tokens > 0
    Trajectory.model_validate(json.loads(trajectory.model_dump_json()))  # JSON round trip
    return trajectory


def run_concurrently(programs: dict, question: str) -> dict:
    """Run programs side by side, as ``evaluate --threads`` does, so the LM engine batches their calls."""
    with ThreadPoolExecutor(max_workers=len(programs)) as pool:
        futures = {name: pool.submit(program, question=question) for name, program in programs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="module")
def runs(lm, retriever, questions):
    """Each program run once on the first dev question (shared by the tests below to keep LM time short)."""
    programs = {name: build_program(name, retriever=retriever, **options) for name, options in SMALL.items()}
    return run_concurrently(programs, questions[0].question)


@pytest.mark.parametrize("name", ["rag", "opera", "apex", "qagent"])
def test_program_answers_a_real_question_with_a_populated_trajectory(name, runs, questions):
    question = questions[0]
    trajectory = check_contract(runs[name], name)
    assert trajectory.queries and trajectory.retrieved, "the program never searched"
    assert set(trajectory.retrieved_titles()) <= {p.title for q in questions for p in q.paragraphs}
    assert trajectory.rounds >= 1
    if name == "rag":
        assert trajectory.usage.calls == 1 and trajectory.queries == [question.question]
    if name != "rag":
        plan = trajectory.plans[0]
        assert plan.source == "planner" and 1 <= len(plan.steps) <= SMALL[name].get("max_steps", 3)
        assert plan.fallback == any(issue.kind == "fallback_one_step" for issue in plan.issues)
    if name in {"opera", "apex"}:
        first = trajectory.subgoals[0]
        assert first.queries and first.filled
        assert len(trajectory.subgoals) >= len(trajectory.plans[0].steps)
        assert all(passage.step is not None for passage in trajectory.retrieved)
        # the plan, then per sub-goal a query and an analysis, and the answer (reflection and rewrites on top)
        assert trajectory.usage.calls >= 2 * len(trajectory.plans[0].steps) + 2
    if name == "apex":
        assert len(trajectory.reflections) == 1
        assert trajectory.rounds == 1 + (not trajectory.reflections[0].enough)
    if name == "qagent":
        assert len(trajectory.queries) <= SMALL[name]["max_queries"] * trajectory.rounds
        assert trajectory.rounds == 1 + (not trajectory.reflections[0].enough)


@pytest.mark.parametrize("name", ["rag", "opera", "apex", "qagent"])
def test_an_empty_question_is_answered_empty_without_an_lm_call(name, retriever):
    empty = build_program(name, retriever=retriever)(question="   ")
    assert empty.answer == "" and empty.trajectory.errors == ["empty question"]
    assert empty.trajectory.usage.calls == 0


def test_an_overlong_question_is_truncated_and_answered(lm, retriever):
    long = build_program("rag", retriever=retriever)(question="Who founded Rendezvous Music? " + "very " * 400)
    trajectory = check_contract(long, "rag")
    assert any("truncated" in error for error in trajectory.errors)
    assert len(trajectory.queries[0]) <= 1000


FRUGAL = {"max_steps": 2, "max_rewrites": 0, "write_queries": False}


@pytest.fixture(scope="module")
def silent_runs(lm, questions):
    options = {"opera": FRUGAL, "apex": {**FRUGAL, "max_reflections": 1}, "qagent": {"max_rounds": 1}}
    programs = {name: build_program(name, retriever=SilentRetriever(), **opts) for name, opts in options.items()}
    return run_concurrently(programs, questions[1].question)


@pytest.mark.parametrize("name", ["opera", "apex", "qagent"])
def test_a_retriever_that_finds_nothing_still_gives_an_answer_and_a_record(name, silent_runs):
    trajectory = check_contract(silent_runs[name], name)
    assert trajectory.retrieved == [] and trajectory.queries
    assert trajectory.errors == []
    if name != "qagent":
        assert trajectory.subgoals and all(not record.answered for record in trajectory.subgoals)
        assert all(record.analysis == "no passages retrieved" for record in trajectory.subgoals)


def test_a_failing_retriever_is_recorded_not_raised(lm, questions):
    prediction = build_program("rag", retriever=BrokenRetriever())(question=questions[2].question)
    trajectory = check_contract(prediction, "rag")
    assert any("index file vanished" in error for error in trajectory.errors)


def test_qagent_plug_and_play_answers_with_the_frozen_generator(lm, retriever, questions):
    program = build_program("qagent", retriever=retriever, frozen_generator=lm, max_rounds=1, max_queries=2)
    assert not any(name.startswith("frozen") for name, _ in program.named_predictors()), "frozen must stay out"
    assert program.deepcopy().frozen_lm is lm and program.deepcopy().retriever is retriever
    prediction = program(question=questions[0].question)
    trajectory = check_contract(prediction, "qagent")
    assert trajectory.frozen_answer == prediction.answer
    assert trajectory.frozen_generator
    assert trajectory.reflections == []  # one round: nothing left to reflect on


def test_ask_prints_the_answer_and_trajectory_as_json(lm, retriever, questions, monkeypatch, tmp_path):
    import typer

    from apexdsp.cli import ask_cmd

    # The index opener is swapped for the BM25 index above: building a ColBERT index is another test's job.
    monkeypatch.setattr("apexdsp.indexes.open_retriever", lambda path, kind="hybrid": retriever, raising=False)
    app = typer.Typer()
    ask_cmd.register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer from flattening ``ask``
    result = CliRunner().invoke(app, ["ask", "--program", "rag", "--index", str(tmp_path), "--set", "k=3",
                                      "--json", questions[0].question])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["answer"] == payload["trajectory"]["answer"]
    assert len(payload["trajectory"]["retrieved"]) == 3


def test_the_tree_shows_plan_sub_goals_searches_and_answer(runs):
    from rich.console import Console

    from apexdsp.cli.ask_cmd import trajectory_tree

    trajectory = runs["apex"].trajectory
    console = Console(width=200, record=True)
    console.print(trajectory_tree(trajectory))
    text = console.export_text()
    assert "plan (planner, round 1)" in text and "sub-goal 1" in text and "reflection after round 1" in text
    assert f"query: {trajectory.subgoals[0].queries[0][:40]}" in text
    assert trajectory.retrieved[0].title in text
    assert "LM calls" in text
