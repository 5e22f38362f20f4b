"""The tolerant adapter repairs broken formats and records every repair."""

from __future__ import annotations

import dspy

from apexdsp.lm.adapter import TolerantChatAdapter, record_parse_failures


class OneField(dspy.Signature):
    """Answer."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class TwoFields(dspy.Signature):
    """Analyse then answer."""

    question: str = dspy.InputField()
    analysis: str = dspy.OutputField()
    answer: str = dspy.OutputField()


def test_well_formed_completion_parses_without_a_recorded_failure():
    with record_parse_failures() as log:
        fields = TolerantChatAdapter().parse(OneField, "[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]]")
    assert fields == {"answer": "Paris"}
    assert log.failures == []


def test_bare_completion_becomes_the_single_output_field_and_is_recorded():
    with record_parse_failures() as log:
        fields = TolerantChatAdapter().parse(OneField, "Paris\n[[ ## completed ## ]]")
    assert fields == {"answer": "Paris"}
    assert len(log.failures) == 1
    assert log.failures[0].missing_fields == ["answer"]
    assert log.failures[0].signature == "OneField"


def test_missing_field_of_several_is_filled_empty_and_recorded():
    with record_parse_failures() as log:
        fields = TolerantChatAdapter().parse(TwoFields, "[[ ## analysis ## ]]\nIt is in France.")
    assert fields == {"analysis": "It is in France.", "answer": ""}
    assert log.failures[0].missing_fields == ["answer"]


def test_no_log_active_still_parses():
    assert TolerantChatAdapter().parse(OneField, "") == {"answer": ""}


def test_loosely_spaced_headers_are_understood_without_a_failure():
    with record_parse_failures() as log:
        fields = TolerantChatAdapter().parse(TwoFields, "[[## analysis ## ]] It is in France. [[ ##answer##]]\nParis")
    assert fields == {"analysis": "It is in France.", "answer": "Paris"}
    assert log.failures == []
