"""The tolerant plan parser, placeholder filling, dependency order and the other pure parsers of programs/."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from apexdsp.indexes.base import SearchHit
from apexdsp.programs.evidence import clean_query, fuse, is_non_answer, parse_yes_no, strip_echo
from apexdsp.programs.executor import fill_placeholders, findings_text
from apexdsp.programs.planner import Plan, SubGoal, parse_plan
from apexdsp.programs.qagent import parse_queries
from apexdsp.programs.reflector import parse_reflection
from apexdsp.programs.trajectory import SubGoalRecord, Trajectory

QUESTION = "When was the director of Jaws born?"


def kinds(parsed) -> list[str]:
    return [issue.kind for issue in parsed.issues]


def steps(parsed) -> list[tuple[str, list[int]]]:
    return [(step.question, step.depends_on) for step in parsed.plan.steps]


TWO_HOP = [("Who directed Jaws?", []), ("When was #1 born?", [1])]


@pytest.mark.parametrize("text", [
    "1. Who directed Jaws?\n2. When was #1 born?",
    "1) Who directed Jaws?\n2) When was #1 born?",
    "Step 1: Who directed Jaws?\nStep 2: When was #1 born?",
    "- Who directed Jaws?\n- When was #1 born?",
    "* Who directed Jaws?\n* When was #1 born?",
    "**1.** Who directed Jaws?\n**2.** When was #1 born?",
    "Plan:\n1. Who directed Jaws?\n2. When was #1 born? (uses #1)",
    "1. Who directed Jaws? 2. When was #1 born?",
    "Who directed Jaws? When was #1 born?",
    "Who directed Jaws?\nWhen was #1 born?",
    "[[ ## plan ## ]]\n1. Who directed Jaws?\n2. When was #1 born?\n\n[[ ## completed ## ]]",
    '[{"question": "Who directed Jaws?"}, {"question": "When was #1 born?", "depends_on": [1]}]',
    '{"steps": ["Who directed Jaws?", "When was #1 born?"]}',
])
def test_valid_plans_in_every_list_style_parse_to_the_same_two_hop_plan(text):
    parsed = parse_plan(text, QUESTION)
    assert steps(parsed) == TWO_HOP
    assert parsed.issues == [] and not parsed.fallback


def test_dependency_from_an_annotation_without_placeholder_is_kept():
    parsed = parse_plan("1. Who directed Jaws?\n2. Where was that director born? (depends on 1)", QUESTION)
    assert steps(parsed) == [("Who directed Jaws?", []), ("Where was that director born?", [1])]


@pytest.mark.parametrize("text", [
    "", "   ", "Paris", "The answer to this question is:\n\n[#1]", "1. The sub-questions are:",
    "Jaws is a film by Spielberg.", "[[ ## plan ## ]]\n\n[[ ## completed ## ]]", "1.\n2.", "{}", "[]", "?!?",
])
def test_garbage_falls_back_to_the_question_as_one_step_and_says_so(text):
    parsed = parse_plan(text, QUESTION)
    assert parsed.fallback
    assert steps(parsed) == [(QUESTION, [])]
    assert kinds(parsed) == ["unparseable", "fallback_one_step"]
    record = parsed.plan.to_record(raw=text, issues=parsed.issues, fallback=True)
    assert record.fallback and record.repaired


def test_a_cycle_is_broken_by_dropping_the_forward_reference():
    parsed = parse_plan("1. Who directed #2?\n2. When was #1 born?", QUESTION)
    assert "cycle" in kinds(parsed)
    assert steps(parsed) == [("Who directed?", []), ("When was #1 born?", [1])]


def test_a_three_step_cycle_is_broken_and_the_plan_stays_executable():
    parsed = parse_plan("1. Which film is #3 in?\n2. Who directed #1?\n3. Which actor starred with #2?", QUESTION)
    assert kinds(parsed).count("cycle") == 1
    Plan.model_validate(parsed.plan.model_dump())  # the invariant holds
    for step in parsed.plan.steps:
        assert all(dep < step.id for dep in step.depends_on)


def test_a_forward_reference_without_cycle_is_reordered_and_renumbered():
    parsed = parse_plan("1. When was #2 born?\n2. Who directed Jaws?", QUESTION)
    assert kinds(parsed) == ["reordered"]
    assert steps(parsed) == TWO_HOP


def test_a_reference_to_a_missing_step_is_dropped_and_recorded():
    parsed = parse_plan("1. Who directed Jaws?\n2. When was #7 born?", QUESTION)
    assert kinds(parsed) == ["missing_reference"]
    assert steps(parsed) == [("Who directed Jaws?", []), ("When was born?", [])]


def test_a_self_reference_is_dropped_and_recorded():
    parsed = parse_plan("1. Who directed Jaws?\n2. When was #2 born?", QUESTION)
    assert kinds(parsed) == ["self_reference"]
    assert parsed.plan.steps[1].depends_on == []


def test_duplicates_are_dropped_and_references_to_them_follow_the_kept_step():
    parsed = parse_plan("1. Who directed Jaws?\n2. who directed jaws\n3. When was #2 born?", QUESTION)
    assert "duplicate_step" in kinds(parsed)
    assert steps(parsed) == TWO_HOP


def test_long_plans_are_truncated_and_references_into_the_cut_become_missing():
    text = "\n".join(f"{i}. Sub question number {i}?" for i in range(1, 5)) + "\n5. What about #4?"
    parsed = parse_plan(text, QUESTION, max_steps=3)
    assert kinds(parsed) == ["truncated"]
    assert len(parsed.plan.steps) == 3


def test_labels_not_starting_at_one_are_renumbered_with_their_references():
    parsed = parse_plan("2. Who directed Jaws?\n3. When was #2 born?", QUESTION)
    assert kinds(parsed) == ["renumbered"]
    assert steps(parsed) == TWO_HOP


def test_the_plan_model_rejects_invalid_plans():
    with pytest.raises(ValidationError):
        Plan(steps=[SubGoal(id=1, question="When was #2 born?", depends_on=[2]), SubGoal(id=2, question="x y")])
    with pytest.raises(ValidationError):
        Plan(steps=[SubGoal(id=1, question="a"), SubGoal(id=2, question="When was #1 born?")])  # undeclared
    with pytest.raises(ValidationError):
        Plan(steps=[])


def test_plan_renders_back_to_the_format_the_planner_is_asked_for():
    parsed = parse_plan("- Who directed Jaws?\n- When was #1 born?", QUESTION)
    assert parse_plan(parsed.plan.render(), QUESTION).plan == parsed.plan


def record(step: int, answer: str, answered: bool = True, question: str = "Who directed Jaws?") -> SubGoalRecord:
    return SubGoalRecord(step=step, question=question, filled=question, answer=answer, answered=answered)


def test_placeholders_are_filled_from_memory():
    filled, unfilled = fill_placeholders("When was #1 born?", {1: record(1, "Steven Spielberg")})
    assert filled == "When was Steven Spielberg born?" and unfilled == []


def test_an_unfillable_placeholder_keeps_the_sub_question_and_is_reported():
    filled, unfilled = fill_placeholders("When was #1 born?", {1: record(1, "", answered=False)})
    assert unfilled == [1]
    assert "Who directed Jaws" in filled and "#1" not in filled
    filled, unfilled = fill_placeholders("Where is #3 from?", {})
    assert unfilled == [3] and filled == "Where is from?"


def test_a_best_guess_fills_but_findings_mark_it_unsure():
    memory = {1: record(1, "Spielberg", answered=False)}
    assert fill_placeholders("When was #1 born?", memory) == ("When was Spielberg born?", [])
    assert "(unsure)" in findings_text(memory.values())


@pytest.mark.parametrize(("enough", "follow_up", "expected_enough", "expected"), [
    ("yes", "", True, []),
    ("no", "1. When was Spielberg born?\n2. Who directed Jaws?", False, ["When was Spielberg born?"]),
    ("No.", "- Where was Spielberg born?", False, ["Where was Spielberg born?"]),
    ("", "When was Spielberg born?", False, ["When was Spielberg born?"]),  # unreadable yes/no: follow-ups -> no
    ("maybe", "", True, []),  # unreadable and nothing proposed: stop
    ("no", "", True, []),  # no without a new question: stop
])
def test_reflection_parsing(enough, follow_up, expected_enough, expected):
    reflection = parse_reflection(enough, follow_up, asked=["Who directed Jaws?"], round=0, max_follow_ups=2)
    assert reflection.enough is expected_enough
    assert reflection.follow_ups == expected
    if enough not in {"yes", "no", "No."} or (enough == "no" and not follow_up):
        assert reflection.note


def test_queries_come_from_the_lm_list_then_fill_from_the_sub_questions_without_repeats():
    raw = "1. Jaws director\n2. query: Jaws director\n3. \"Spielberg birth date\""
    queries = parse_queries(raw, ["Who directed Jaws?", QUESTION], issued=["jaws film"], limit=3,
                            anchor=QUESTION + " Spielberg")
    assert queries == ["Jaws director", "Spielberg birth date", "Who directed Jaws?"]
    assert parse_queries("", ["Who directed #1?"], issued=[], limit=3) == ["Who directed?"]
    assert parse_queries("Jaws director\nSpielberg birth", [], issued=[], limit=3, anchor=QUESTION + " Spielberg") == [
        "Jaws director", "Spielberg birth"]
    assert parse_queries("1. Here are the queries:\n2. Paris hotels", [QUESTION], issued=[], limit=2,
                         anchor=QUESTION) == [QUESTION]


def hit(pid: str, rank: int) -> SearchHit:
    return SearchHit(pid=pid, title=pid, text="t", score=1.0 / rank, rank=rank)


def test_fusion_rewards_passages_found_by_several_queries():
    fused = fuse([[hit("a", 1), hit("b", 2)], [hit("c", 1), hit("b", 2)]], limit=3)
    assert [p.pid for p in fused] == ["b", "a", "c"]


def test_small_text_helpers():
    assert clean_query("Query: \"Jaws director\"\nmore", "Who directed Jaws?") == "Jaws director"
    assert clean_query("?", "Who directed Jaws?") == "Who directed Jaws?"
    assert clean_query("The search query for the question is:", "Who directed Jaws?") == "Who directed Jaws?"
    assert clean_query("Paris travel guide", "Who directed Jaws?") == "Who directed Jaws?"  # off topic
    assert parse_yes_no("Yes, it does") is True and parse_yes_no("no.") is False and parse_yes_no("") is None
    assert is_non_answer("Unknown.") and is_non_answer("") and not is_non_answer("Paris")
    assert strip_echo("[2] Jaws: a film") == "Jaws: a film"
    assert strip_echo("The answer to the question is:") == "" and strip_echo("Answer: Paris") == "Paris"
    assert strip_echo("Answering machines") == "Answering machines"


def test_trajectory_with_plans_and_sub_goals_is_json_serialisable():
    parsed = parse_plan("1. Who directed #2?\n2. When was #1 born?", QUESTION)
    trajectory = Trajectory(program="apex", question=QUESTION)
    trajectory.plans.append(parsed.plan.to_record(raw="x", issues=parsed.issues))
    trajectory.subgoals.append(record(1, "Spielberg"))
    again = Trajectory.model_validate(json.loads(trajectory.model_dump_json()))
    assert again == trajectory and again.plans[0].issues[0].kind == "cycle"
