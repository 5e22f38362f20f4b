"""Extracting the short answer from a small model's reply."""

from __future__ import annotations

import pytest

from apexdsp.programs.base import clean_answer


@pytest.mark.parametrize(("reply", "expected"), [
    ("Paris.", "Paris"),
    ("The answer to the question is: 10", "10"),
    ("The answer to this question is yes.", "yes"),
    ("The answer is:\nWayman Tisdale", "Wayman Tisdale"),
    ("Answer: 1987", "1987"),
    ('"Gangsta\'s Paradise"', "Gangsta's Paradise"),
    ("The answer to this question is:\n\n[#1]\n", ""),
    ("", ""),
    (None, ""),
    ("Wait...", "Wait..."),
])
def test_clean_answer(reply, expected):
    assert clean_answer(reply) == expected


def test_clean_answer_never_invents_text():
    reply = "The answer to this question is: the Eiffel Tower, built in 1889."
    assert clean_answer(reply) in reply


@pytest.mark.parametrize(("question", "expected"), [
    ("Were Scott Derrickson and Ed Wood of the same nationality?", True),
    ("Are Jim Lindberg and Alison Moyet singers of the same nationality?", True),
    ("Is the Sacramento River longer than the Delaware River?", True),
    ("Is Lake Tahoe or Lake Erie deeper?", False),  # names its answer
    ("Which is older, Gagea or Sorbaria?", False),
    ("What government position was held by the woman who portrayed Corliss Archer?", False),
    ("", False),
])
def test_yes_no_questions_are_recognised(question, expected):
    from apexdsp.programs.answer import is_yes_no_question

    assert is_yes_no_question(question) is expected
