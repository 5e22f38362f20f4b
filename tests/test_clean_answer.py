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
