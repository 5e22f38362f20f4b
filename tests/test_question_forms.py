"""Question forms: the two options of an "X or Y" question, and the choice route of the answer step."""

from __future__ import annotations

import dspy
import pytest

from apexdsp.data.loaders import read_questions
from apexdsp.lm.adapter import TolerantChatAdapter
from apexdsp.lm.registry import get_lm
from apexdsp.metrics import exact_match
from apexdsp.programs.answer import PassageReader
from apexdsp.programs.question_forms import (choice_options, chosen_option, format_options, is_yes_no_question,
                                             parse_options)
from apexdsp.programs.trajectory import RetrievedPassage


@pytest.mark.parametrize(("question", "expected"), [
    ("Who was born first, Bobcat Goldthwait or Maurice Elvey?", ("Bobcat Goldthwait", "Maurice Elvey")),
    ("Which band, A Silent Film or The Frames, has more members?", ("A Silent Film", "The Frames")),
    ("Which documentary film was released first Tar Creek or Volcanic Sprint?", ("Tar Creek", "Volcanic Sprint")),
    ("Which airport Grand Forks International Airport or El Paso International Airport is closer to their town ?",
     ("Grand Forks International Airport", "El Paso International Airport")),
    ("Was Pennsylvania State University or University of California, San Francisco founded first?",
     ("Pennsylvania State University", "University of California, San Francisco")),
    ("Which of these battles occurred earlier--the Battle of Peleliu or the Battle of Belleau Wood?",
     ("the Battle of Peleliu", "the Battle of Belleau Wood")),
    ("Which musical fantasy film is older, Bedknobs and Broomsticks or The Muppet Christmas Carol?",
     ("Bedknobs and Broomsticks", "The Muppet Christmas Carol")),
    ("Which building is used for more different uses, MiMA or 270 Park Avenue?", ("MiMA", "270 Park Avenue")),
    ("Which magazine has more issues per month, Club or Pro Football Weekly", ("Club", "Pro Football Weekly")),
    # "or" inside a clause, between words that are not names: no options
    ("Do both Adventist World and Girls' Life have a headquarter or editor based in Maryland?", None),
    ("Who directed the film that was shot in or around Leland, North Carolina in 1986", None),
    ("What government position was held by the woman who portrayed Corliss Archer?", None),
    ("", None),
])
def test_choice_options_are_read_from_the_question(question, expected):
    assert choice_options(question) == expected


def test_options_round_trip_and_a_reply_picks_one():
    options = ("Bedknobs and Broomsticks", "The Muppet Christmas Carol")
    assert parse_options(format_options(options)) == options
    assert parse_options("a passage") is None and parse_options(None) is None
    assert [chosen_option(reply, options) for reply in ("A", "B", " b) ", "the muppet christmas carol", "", None)] \
        == [options[0], options[1], options[1], options[1], options[0], options[0]]


def test_dev_comparisons_offer_their_gold_answer(data_dir):
    """The measured claim of the module docstring: on HotpotQA dev, every "or" question gets options, and
    for 34 of the 42 the gold answer is one of them; the option route and the yes/no route never overlap."""
    questions = read_questions(data_dir / "hotpotqa" / "dev.jsonl")
    with_or = [q for q in questions if " or " in f" {q.question} "]
    offered = [q for q in with_or if choice_options(q.question)]
    assert (len(with_or), len(offered)) == (42, 42)
    assert sum(any(exact_match(o, q.answers) for o in choice_options(q.question)) for q in offered) == 34
    assert not any(is_yes_no_question(q.question) for q in offered)


def test_the_reader_answers_a_comparison_with_one_of_its_options(tiny_model_dir):
    """Even a random-weight model's answer to "X or Y" is one option word for word: one constrained token."""
    lm = get_lm(str(tiny_model_dir), max_tokens=16)
    passages = [RetrievedPassage(pid="1", title="Diva", text="Diva is a magazine founded in 1994.", score=1.0)]
    questions = ["Which magazine was founded first, Diva or Elle?", "Who was born first, Bobcat Goldthwait or "
                 "Maurice Elvey?"]
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        answers = [PassageReader()(question=q, passages=passages).answer for q in questions]
    assert answers[0] in {"Diva", "Elle"}
    assert answers[1] in {"Bobcat Goldthwait", "Maurice Elvey"}
