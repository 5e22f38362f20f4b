"""Rewards on hand-made plans and trajectories, with real BM25 search over real benchmark paragraphs.

The decomposition reward must order plans the way a person would (a chained two-step plan above a
one-step plan, a fallback and a plan that repeats itself), punish what the parser had to repair, and
ground executability in what the sub-questions really retrieve. Every reward must stay finite on
malformed input. One test asks the real SmolLM2 frozen generator.
"""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from apexdsp.data.loaders import read_questions
from apexdsp.data.records import Passage, Question
from apexdsp.errors import ApexError
from apexdsp.programs.planner import parse_plan
from apexdsp.programs.trajectory import PlanRecord, RetrievedPassage, SubGoalRecord, Trajectory
from apexdsp.rewards import (REWARDS, DecompositionWeights, FrozenGenerator, RewardResult, answer_reward,
                             decomposition_reward, decomposition_reward_from_trajectory, decomposition_rewards,
                             frozen_generator_reward, get_reward, score_trajectory_with_frozen_generator)

COLLIER_GOOD = "1. Which county does the Collier Area Transit system serve?\n2. How many people live in #1?"
BUBYE_GOOD = "1. Which country is the Bubye River in?\n2. What is the name of the waterfall in #1?"


def bm25_over(questions: list[Question]):
    """A real BM25 index over the questions' own paragraphs (gold and distractors), one passage per title."""
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import Corpus

    passages: dict[str, Passage] = {}
    for question in questions:
        for paragraph in question.paragraphs:
            passages.setdefault(paragraph.title, Passage(id=f"p{len(passages)}", title=paragraph.title,
                                                         text=paragraph.text))
    return BM25Retriever(Corpus(passages=list(passages.values())))


class CountingRetriever:
    """Passes searches to a real retriever and counts the ``search_batch`` calls."""

    name = "counting"

    def __init__(self, inner):
        self.inner, self.calls, self.queries = inner, 0, 0

    def search(self, query, k=5):
        return self.search_batch([query], k)[0]

    def search_batch(self, queries, k=5):
        self.calls += 1
        self.queries += len(queries)
        return self.inner.search_batch(queries, k=k)


class BrokenRetriever:
    """A retriever whose index file has gone (fault injection, not a stand-in for search results)."""

    name = "broken"

    def search(self, query, k=5):
        raise OSError("index file vanished")

    def search_batch(self, queries, k=5):
        raise OSError("index file vanished")


@pytest.fixture(scope="module")
def hotpot(data_dir):
    questions = read_questions(data_dir / "hotpotqa" / "dev.jsonl", limit=4)
    return {"tisdale": questions[0], "collier": questions[3], "all": questions}


@pytest.fixture(scope="module")
def hotpot_bm25(hotpot):
    return bm25_over(hotpot["all"])


@pytest.fixture(scope="module")
def bubye(data_dir):
    questions = read_questions(data_dir / "musique" / "train.jsonl")
    return next(q for q in questions if q.id == "2hop__205146_62031")


@pytest.fixture(scope="module")
def bubye_bm25(bubye):
    return bm25_over([bubye])


def finite(result: RewardResult) -> bool:
    return math.isfinite(result.value) and all(math.isfinite(v) for v in result.components.values())


# -- decomposition: ordering and format -----------------------------------------------------------------

def test_good_bridge_plan_beats_one_step_fallback_and_duplicates(hotpot, hotpot_bm25):
    question = hotpot["collier"]
    score = lambda plan: decomposition_reward(question, plan, retriever=hotpot_bm25)  # noqa: E731
    good = score(COLLIER_GOOD)
    one_step = score("1. How many people live in the county served by the Collier Area Transit system?")
    fallback = score("I am not sure what you mean.")
    first = "1. Which county does Collier Area Transit serve?\n"
    repeated = score(first + "2. Which county does Collier Area Transit serve?")
    near_repeat = score(first + "2. What county is served by Collier Area Transit?")
    assert good.components == {"format": 1.0, "structure": 1.0, "placeholder": 1.0, "executability": 1.0}
    assert good.value == pytest.approx(1.0)
    assert good.value > one_step.value > fallback.value == 0.0
    assert good.value > repeated.value and good.value > near_repeat.value
    assert one_step.components["structure"] == 0.0 and one_step.components["placeholder"] == 0.0
    assert repeated.components["format"] < 1.0  # the parser dropped the repeated step
    assert near_repeat.components["structure"] == 0.0  # two steps, but only one distinct hop
    assert fallback.components == {"format": 0.0}


def test_grpo_completion_formats_score_like_plain_text(hotpot):
    """A completion as the planner writes it under DSPy's chat adapter, or in TRL's chat format."""
    question = hotpot["collier"]
    plain = decomposition_reward(question, COLLIER_GOOD)
    adapter = decomposition_reward(question, f"[[ ## plan ## ]]\n{COLLIER_GOOD}\n\n[[ ## completed ## ]]")
    chat = decomposition_reward(question, [{"role": "assistant", "content": COLLIER_GOOD}])
    assert plain == adapter == chat and plain.value == 1.0


def test_cycle_and_missing_reference_lower_format(hotpot):
    question = hotpot["collier"]
    clean = decomposition_reward(question, COLLIER_GOOD)
    cycle = decomposition_reward(question, "1. Which county does #2 serve?\n2. How many people live in #1?")
    missing = decomposition_reward(question, "1. Which county does the Collier Area Transit system serve?\n"
                                             "2. How many people live in #3?")
    assert clean.components["format"] == 1.0
    assert 0.0 < cycle.components["format"] < 1.0 and any("cycle" in note for note in cycle.notes)
    assert 0.0 < missing.components["format"] < 1.0 and any("missing_reference" in n for n in missing.notes)
    assert cycle.value < clean.value and missing.value < clean.value
    # the dropped "#3" leaves step 2 unchained: the placeholder check sees it too
    assert missing.components["placeholder"] == 0.0


def test_a_step_restating_the_question_costs_structure(hotpot):
    question = hotpot["collier"]
    restated = decomposition_reward(question, f"1. {question.question}\n2. How many people live in #1?")
    assert restated.components["structure"] == 0.5
    assert any("restate the question" in note for note in restated.notes)
    # a first hop that repeats the question's entities but not what it asks is not a restatement
    assert decomposition_reward(question, COLLIER_GOOD).components["structure"] == 1.0


def test_too_many_steps_are_truncated_and_cost_format(hotpot):
    five = "\n".join(f"{i}. Which fact number {i} about Collier Area Transit matters?" for i in range(1, 6))
    result = decomposition_reward(hotpot["collier"], five, max_steps=4)
    assert 0.0 < result.components["format"] < 1.0
    assert any("truncated" in note for note in result.notes)
    assert result.components["structure"] < 1.0  # 4 steps for a 2-hop question


def test_comparison_rewards_independent_lookups(hotpot_bm25):
    question = Question(id="cmp", question="Who was born first, Agatha Christie or Clement Greenberg?",
                        answer="Agatha Christie", type="comparison",
                        supporting_titles=["Agatha Christie", "Clement Greenberg"])
    independent = decomposition_reward(question, "1. When was Agatha Christie born?\n"
                                                 "2. When was Clement Greenberg born?")
    chained = decomposition_reward(question, "1. When was Agatha Christie born?\n2. Who was born after #1?")
    assert independent.components["placeholder"] == 1.0
    assert chained.components["placeholder"] == 0.5


# -- decomposition: retrieval-grounded executability ----------------------------------------------------

def test_executability_is_real_retrieval_coverage(hotpot, hotpot_bm25):
    question = hotpot["collier"]
    on_topic = decomposition_reward(question, COLLIER_GOOD, retriever=hotpot_bm25)
    off_topic = decomposition_reward(question, "1. When did the Dar es Salaam bus rapid transit begin operations?\n"
                                               "2. Which company built #1?", retriever=hotpot_bm25)
    assert on_topic.components["executability"] == 1.0
    assert off_topic.components["executability"] == 0.0
    assert on_topic.value > off_topic.value
    assert "executability" not in decomposition_reward(question, COLLIER_GOOD).components  # no retriever


def test_placeholders_filled_from_the_run_then_from_gold(bubye, bubye_bm25):
    def run_with(answer: str | None) -> Trajectory:
        plan = parse_plan(BUBYE_GOOD, bubye.question)
        trajectory = Trajectory(program="opera", question=bubye.question, plans=[plan.plan.to_record(raw=BUBYE_GOOD)])
        if answer is not None:
            trajectory.subgoals.append(SubGoalRecord(step=1, question="Which country is the Bubye River in?",
                                                     answer=answer, answered=True))
        return trajectory

    right = decomposition_reward_from_trajectory(bubye, run_with("Zimbabwe"), retriever=bubye_bm25)
    wrong = decomposition_reward_from_trajectory(bubye, run_with("Tanzania"), retriever=bubye_bm25)
    gold = decomposition_reward_from_trajectory(bubye, run_with(None), retriever=bubye_bm25)
    assert right.components["executability"] == 1.0
    assert wrong.components["executability"] == 0.5  # "the waterfall in Tanzania" misses Victoria Falls
    assert gold.components["executability"] == 1.0
    assert any("run's answer 'Zimbabwe'" in note for note in right.notes)
    assert any("gold answer 'Zimbabwe'" in note for note in gold.notes)
    # without a gold decomposition nor a run, "#1" is dropped and the second hop is not found
    no_gold = bubye.model_copy(update={"decomposition": None})
    assert decomposition_reward(no_gold, BUBYE_GOOD, retriever=bubye_bm25).components["executability"] == 0.5


def test_gold_answer_fills_only_when_the_step_search_finds_it(bubye, bubye_bm25):
    result = decomposition_reward(bubye, "1. Which waterfall is the most famous one?\n2. Which country is #1 in?",
                                  retriever=bubye_bm25)
    assert any("its search missed the gold answer" in note for note in result.notes)


def test_batch_scoring_matches_single_and_batches_searches(hotpot, bubye):
    retriever = CountingRetriever(bm25_over([*hotpot["all"], bubye]))
    questions = [hotpot["collier"], hotpot["collier"], bubye, hotpot["tisdale"], bubye]
    plans = [COLLIER_GOOD, COLLIER_GOOD, BUBYE_GOOD, "", "1. Who knows?"]
    batch = decomposition_rewards(questions, plans, retriever=retriever)
    assert retriever.calls == 2  # two waves: first hops, then the hops that use #1
    assert retriever.queries == 5  # the repeated plan's queries are searched once; "" is never searched
    single = [decomposition_reward(q, p, retriever=retriever.inner) for q, p in zip(questions, plans)]
    assert [r.value for r in batch] == [r.value for r in single]
    assert batch[0] == batch[1]


def test_musique_gold_agreement(bubye):
    own_words = decomposition_reward(bubye, "1. Bubye River >> country\n2. what is the name of the waterfall in #1")
    close = decomposition_reward(bubye, BUBYE_GOOD)
    unrelated = decomposition_reward(bubye, "1. Who founded Zimbabwe Airways?\n2. When was #1 born?")
    assert own_words.components["gold_agreement"] == pytest.approx(1.0)
    assert 0.6 < close.components["gold_agreement"] < 1.0
    assert unrelated.components["gold_agreement"] < 0.3
    assert close.value > unrelated.value
    assert any("gold decomposition" in note for note in close.notes)


def test_weights_renormalise_and_validate(hotpot):
    only_format = DecompositionWeights(format=1.0, structure=0, placeholder=0, executability=0, gold_agreement=0)
    result = decomposition_reward(hotpot["collier"], "1. How many people live in Collier County?", weights=only_format)
    assert result.value == result.components["format"] == 1.0
    from_config = decomposition_reward(hotpot["collier"], "1. How many people live in Collier County?",
                                       weights={"structure": 0, "placeholder": 0})
    assert from_config.value == 1.0  # only format (1.0) is left: no retriever, no gold decomposition
    with pytest.raises(ValidationError):
        DecompositionWeights(format=0, structure=0, placeholder=0, executability=0, gold_agreement=0)
    with pytest.raises(ValidationError):
        decomposition_reward(hotpot["collier"], COLLIER_GOOD, weights={"fromat": 1.0})
    with pytest.raises(ValidationError):
        DecompositionWeights(format=-1)


# -- decomposition: malformed input ---------------------------------------------------------------------

@pytest.mark.parametrize("completion", [None, "", "   \n", "[[ ## plan ## ]]", "[{", "1.", "lorem ipsum dolor",
                                        "1. #1 #2 #3?\n2. #2?"])
def test_malformed_completions_score_finite_and_low(hotpot, hotpot_bm25, completion):
    result = decomposition_reward(hotpot["collier"], completion, retriever=hotpot_bm25)
    assert finite(result) and 0.0 <= result.value <= 0.5


def test_degenerate_questions_and_trajectories_never_raise(hotpot, hotpot_bm25):
    bare = Question(id="x", question="Who?", answer="", supporting_titles=[])
    result = decomposition_reward(bare, COLLIER_GOOD, retriever=hotpot_bm25)
    assert finite(result) and "executability" not in result.components
    assert any("no supporting titles" in note for note in result.notes)
    no_plan = Trajectory(program="rag", question="q")
    assert decomposition_reward_from_trajectory(hotpot["collier"], no_plan, retriever=hotpot_bm25).value == 0.0
    empty_record = Trajectory(program="apex", question="q", plans=[PlanRecord(steps=[])])
    assert decomposition_reward_from_trajectory(hotpot["collier"], empty_record).value == 0.0
    broken = decomposition_reward(hotpot["collier"], COLLIER_GOOD, retriever=BrokenRetriever())
    assert finite(broken) and "executability" not in broken.components
    assert any("search failed" in note for note in broken.notes)


def test_bad_calls_raise(hotpot):
    with pytest.raises(ApexError):
        decomposition_reward(hotpot["collier"], COLLIER_GOOD, k=0)
    with pytest.raises(TypeError):
        decomposition_reward(hotpot["collier"], 42)
    with pytest.raises(ApexError, match="known rewards"):
        get_reward("bleu")


def test_deterministic(hotpot, hotpot_bm25):
    first = decomposition_reward(hotpot["collier"], COLLIER_GOOD, retriever=hotpot_bm25)
    assert first == decomposition_reward(hotpot["collier"], COLLIER_GOOD, retriever=hotpot_bm25)


# -- frozen generator and answer rewards ----------------------------------------------------------------

def test_frozen_generator_arithmetic(hotpot):
    question = hotpot["collier"]  # answer 321,520
    docs = ["Collier County, Florida: As of the 2010 census, the population was 321,520."]
    assert frozen_generator_reward(question, docs, "321,520").value == 1.5
    assert frozen_generator_reward(question, docs, "Naples").value == 0.5
    assert frozen_generator_reward(question, ["Collier Area Transit runs buses."], "321520").value == 1.0
    assert frozen_generator_reward(question, [], "Naples").value == 0.0
    assert frozen_generator_reward(question, None, None).value == 0.0
    result = frozen_generator_reward(question, docs, None)
    assert result.components == {"em": 0.0, "hit": 1.0} and "no frozen answer" in result.notes


def test_frozen_generator_ignores_hit_for_yes_no():
    question = Question(id="yn", question="Are both guitarists?", answer="no")
    assert frozen_generator_reward(question, ["There is no such record."], "yes").value == 0.0
    assert frozen_generator_reward(question, ["There is no such record."], "no").value == 1.0


def test_score_trajectory_without_calling_a_generator(hotpot):
    question = hotpot["collier"]
    gold = [p for p in question.paragraphs if p.is_supporting]
    trajectory = Trajectory(program="qagent", question=question.question, frozen_answer="321,520",
                            retrieved=[RetrievedPassage(pid=str(i), title=p.title, text=p.text, query="q")
                                       for i, p in enumerate(gold)])
    assert score_trajectory_with_frozen_generator(question, trajectory).value == 1.5  # the recorded answer
    assert REWARDS["frozen_generator"](question, trajectory).value == 1.5
    # no documents: the generator is not asked (a model that cannot be loaded proves it)
    unloadable = FrozenGenerator(lm="no-such-model")
    empty = Trajectory(program="qagent", question=question.question)
    assert score_trajectory_with_frozen_generator(question, empty, unloadable).value == 0.0
    # documents but a generator that fails: scored as no answer, with a note
    failed = score_trajectory_with_frozen_generator(question, trajectory, unloadable)
    assert failed.value == 0.5 and any("frozen generator failed" in note for note in failed.notes)


def test_answer_reward(hotpot):
    question = hotpot["tisdale"]  # Wayman Tisdale
    assert answer_reward(question, "wayman tisdale.", "em").value == 1.0
    assert answer_reward(question, "Tisdale", "em").value == 0.0
    assert answer_reward(question, "Tisdale", "f1").value == pytest.approx(2 / 3)
    assert answer_reward(question, None, "f1").value == 0.0
    assert REWARDS["answer_em"](question, Trajectory(program="rag", question="q", answer="Wayman Tisdale")).value == 1.0
    assert REWARDS["answer_f1"](question, "Tisdale").components == {"em": 0.0, "f1": pytest.approx(2 / 3)}
    with pytest.raises(ApexError):
        answer_reward(question, "x", "bleu")


def test_registry_names_every_reward(hotpot):
    assert set(REWARDS) >= {"decomposition", "frozen_generator", "answer_em", "answer_f1"}
    assert get_reward("decomposition")(hotpot["collier"], COLLIER_GOOD).components["format"] == 1.0
    with pytest.raises(ValueError):
        RewardResult(float("nan"))


@pytest.mark.slow
def test_real_frozen_generator_answers_from_gold_paragraphs(hotpot):
    """One uncached SmolLM2 call on one question's two gold paragraphs, prompt and answer kept short."""
    import torch

    from apexdsp.lm.registry import get_lm

    torch.set_num_threads(2)
    question = hotpot["collier"]
    documents = [f"{p.title}: {p.text}" for p in question.paragraphs if p.is_supporting]
    generator = FrozenGenerator(get_lm("smollm2-135m", cache=False), max_documents=2, document_chars=200,
                                max_tokens=16)
    answer = generator(question=question.question, documents=documents).answer
    assert isinstance(answer, str)
    history = generator.frozen_lm.history[-1]
    user_turn = [m for m in history["messages"] if m["role"] == "user"][-1]
    assert "Collier County, Florida" in user_turn["content"]  # it read the documents
    assert history["usage"]["completion_tokens"] <= 16
    result = frozen_generator_reward(question, documents, answer)
    assert result.components["hit"] == 1.0 and result.value in (0.5, 1.5)
