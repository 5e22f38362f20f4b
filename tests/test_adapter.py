"""The tolerant adapter repairs broken formats and records every repair."""

from __future__ import annotations

from typing import Literal

import dspy

from apexdsp.lm.adapter import TolerantChatAdapter, record_parse_failures
from apexdsp.lm.registry import get_lm


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


def test_remote_lms_and_prefill_off_get_dspy_messages_unchanged():
    """Only in-process engines continue a prefilled turn; a LiteLLM model gets DSPy's messages as they are."""
    remote = dspy.LM("openai/gpt-4o-mini")
    adapter = TolerantChatAdapter()
    messages = adapter.format_call(OneField, [], {"question": "Capital of France?"}, remote)
    assert messages == dspy.ChatAdapter().format(OneField, [], {"question": "Capital of France?"})
    assert messages[-1]["role"] == "user"
    assert adapter.reply_prefix(TwoFields, remote) == ""


def test_local_lm_continues_the_first_output_header(tiny_model_dir):
    """With a real (tiny) local engine the reply is prefilled with the first output header, the model's
    continuation is parsed with that header put back, and prefill=False sends DSPy's messages."""
    lm = get_lm(str(tiny_model_dir), max_tokens=6)
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        prediction = dspy.Predict(TwoFields)(question="Capital of France?")
    call = lm.history[-1]
    assert call["messages"][-1] == {"role": "assistant", "content": "[[ ## analysis ## ]]"}
    raw = call["outputs"][0] if isinstance(call["outputs"][0], str) else call["outputs"][0]["text"]
    assert not raw.startswith("[[ ## analysis ## ]]")  # the model wrote only the continuation
    expected = TolerantChatAdapter().parse(TwoFields, "[[ ## analysis ## ]]" + raw)
    assert prediction.analysis == expected["analysis"] and prediction.answer == expected["answer"]

    with dspy.context(lm=lm, adapter=TolerantChatAdapter(prefill=False)):
        dspy.Predict(TwoFields)(question="Capital of France?")
    assert lm.history[-1]["messages"][-1]["role"] == "user"


class YesNo(dspy.Signature):
    """Decide."""

    question: str = dspy.InputField()
    answer: Literal["yes", "no"] = dspy.OutputField()


def test_a_literal_field_takes_the_choice_its_text_opens_with():
    with record_parse_failures() as log:
        assert TolerantChatAdapter().parse(YesNo, "[[ ## answer ## ]]\nYes, both are American.") == {"answer": "yes"}
        assert TolerantChatAdapter().parse(YesNo, "No.") == {"answer": "no"}
        assert TolerantChatAdapter().parse(YesNo, "[[ ## answer ## ]]\nMaybe") == {"answer": None}
    assert len(log.failures) == 3  # each was a repair


def test_a_local_model_picks_one_of_a_literal_fields_choices(tiny_model_dir):
    """Even a random-weight model answers a yes/no signature with yes or no: one biased token."""
    lm = get_lm(str(tiny_model_dir), max_tokens=16)
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        answers = [dspy.Predict(YesNo)(question=f"Is {n} even?").answer for n in range(4)]
    assert set(answers) <= {"yes", "no"}
    assert len(lm.engine.tokenizer.encode(lm.history[-1]["outputs"][0] if isinstance(lm.history[-1]["outputs"][0], str)
                                          else lm.history[-1]["outputs"][0]["text"], add_special_tokens=False)) == 1
    assert TolerantChatAdapter().parse(YesNo, "[[ ## answer ## ]] Yes") == {"answer": "yes"}
