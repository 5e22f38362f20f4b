"""Answer and retrieval metrics on the cases that trip QA scorers up.

Each expectation is what the standard HotpotQA/SQuAD normalisation gives (on NFC text), including the
surprising ones (curly quotes kept, "1.5" == "15"): the tests document the metric, not an ideal one.
"""

from __future__ import annotations

import json
import unicodedata

import pytest

from apexdsp.metrics import (
    all_gold_at_k,
    answer_hit,
    exact_match,
    f1,
    normalize_answer,
    normalize_title,
    reciprocal_rank,
    supporting_title_recall,
)


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The Beatles", "beatles"),
        ("An apple a day", "apple day"),
        ("the the", ""),  # only articles: nothing left
        ("Theatre of the Absurd", "theatre of absurd"),  # 'the' inside a word stays
        ("U.S.A.", "usa"),
        ("Yes.", "yes"),
        ("  NO! ", "no"),
        ("C++", "c"),
        ("1,000", "1000"),
        ("$1,000", "1000"),
        ("1.5", "15"),  # the decimal point is punctuation too
        ("María", "maría"),  # accents kept (DSPy's NFD variant gives 'marí')
        ("Dvořák", "dvořák"),  # one token (DSPy's NFD variant gives 'dvoř ́k')
        ("à la carte", "à la carte"),
        ("“Hello”", "“hello”"),  # curly quotes are not ASCII punctuation: kept
        ("don’t", "don’t"),
        ("don't", "dont"),
        ("1939–1945", "1939–1945"),  # en dash kept
        ("", ""),
    ],
)
def test_normalize_answer_follows_the_standard(text, normal):
    assert normalize_answer(text) == normal


def test_precomposed_and_decomposed_accents_are_equal():
    decomposed = "Cafe\u0301"
    assert decomposed != "Café"
    assert normalize_answer(decomposed) == normalize_answer("Café") == "café"
    assert exact_match(decomposed, "café") == 1.0
    assert exact_match("cafe", "café") == 0.0  # accents are not stripped


def test_normalisation_is_idempotent():
    for text in ["The  U.S.A.", "María Callas", "“A” – the end", "1,000 of the 2,000"]:
        once = normalize_answer(text)
        assert normalize_answer(once) == once


def test_equals_dspy_normalisation_wherever_nfd_changes_nothing(data_dir):
    """Reuse check: on text that NFD leaves alone, DSPy's normalize_text and ours agree exactly."""
    from dspy.evaluate.metrics import normalize_text

    answers = []
    for name in ["hotpotqa/dev.jsonl", "2wikimultihopqa/train.jsonl", "musique/train.jsonl"]:
        with open(data_dir / name, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                answers += [record["answer"], record["question"], *record["answer_aliases"]]
    unchanged_by_nfd = [text for text in answers if unicodedata.is_normalized("NFD", text)]
    assert len(unchanged_by_nfd) > 1500
    assert all(normalize_answer(text) == normalize_text(text) for text in unchanged_by_nfd)
    # Where NFD does change the text, DSPy's version damages accented words; ours keeps them.
    assert normalize_text("María") == "mari\u0301"  # the final 'a' went as an article
    assert normalize_answer("María") == "maría"


def test_exact_match_articles_punctuation_case():
    assert exact_match("the Eiffel Tower!", "Eiffel Tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match("1000", "1,000") == 1.0
    assert exact_match("1.5", "15") == 1.0
    assert exact_match("don’t stop", "don't stop") == 0.0


def test_aliases_take_the_best():
    aliases = ["G. Stanley Hall", "Stanley Hall"]
    assert exact_match("stanley hall", aliases) == 1.0
    assert f1("Hall", aliases) == pytest.approx(2 * (1 / 1) * (1 / 2) / (1 + 1 / 2))
    assert f1("g stanley hall", aliases) == 1.0
    assert exact_match("Hall", aliases) == 0.0


def test_f1_token_overlap():
    assert f1("the cat sat", "cat") == pytest.approx(2 / 3)  # 'the' dropped: P=1/2, R=1
    assert f1("Barack Obama", "Obama") == pytest.approx(2 / 3)
    assert f1("Paris Paris", "Paris") == pytest.approx(2 / 3)  # repeated tokens count once each
    assert f1("London", "Paris") == 0.0


def test_yes_no_rule():
    assert exact_match("Yes.", "yes") == 1.0
    assert f1("yes", "no") == 0.0
    assert f1("yes it is", "yes") == 0.0  # would be 0.5 by plain token overlap
    assert f1("no", "no way") == 0.0
    assert f1("noanswer", "noanswer") == 1.0
    assert f1("no", ["yes", "no"]) == 1.0


def test_empty_strings():
    assert exact_match("", "") == 0.0  # an empty gold is no answer (the official script says 1)
    assert f1("", "") == 0.0
    assert exact_match("", "Paris") == 0.0
    assert f1("", "Paris") == 0.0
    assert exact_match("the", "a") == 0.0  # both normalise to nothing
    assert exact_match("Paris", []) == 0.0
    assert f1("Paris", []) == 0.0
    assert exact_match("Paris", ["", "Paris"]) == 1.0  # empty aliases are skipped, not fatal


def test_answer_hit_whole_tokens():
    assert answer_hit("Paris", "The capital is Paris, France.") == 1.0
    assert answer_hit("Paris", "A Parisian café") == 0.0
    assert answer_hit("New York", "He moved to New York City in 1990") == 1.0
    assert answer_hit("York New", "New York") == 0.0  # order matters
    assert answer_hit("1,000", "about 1000 people") == 1.0
    assert answer_hit("The Beatles", "a song by beatles") == 1.0


def test_answer_hit_lists_and_empties():
    passages = ["nothing here", "Wayman Tisdale released music", "more text"]
    assert answer_hit("Wayman Tisdale", passages) == 1.0
    assert answer_hit(["nope", "Tisdale"], passages) == 1.0
    assert answer_hit("Tisdale", []) == 0.0
    assert answer_hit("", "anything at all") == 0.0
    assert answer_hit("the", "the the the") == 0.0
    assert answer_hit([], "text") == 0.0


def test_metrics_return_floats():
    assert isinstance(exact_match("a b", "a b"), float)
    assert isinstance(f1("x", "y"), float)
    assert isinstance(answer_hit("x", "x"), float)


def test_title_normalisation():
    assert normalize_title("  Get_Low (Dillon  Francis song) ") == "get low (dillon francis song)"
    assert normalize_title("Cafe\u0301") == normalize_title("Café")
    assert normalize_title("Tennessee") != normalize_title("Tennessee (song)")


def test_supporting_title_recall():
    gold = ["Rendezvous Music", "Wayman Tisdale"]
    retrieved = ["Guy Lewis", "wayman tisdale", "Eddie Hickey", "Rendezvous Music", "Guy Lewis"]
    assert supporting_title_recall(gold, retrieved) == 1.0
    assert supporting_title_recall(gold, retrieved, k=2) == 0.5
    assert supporting_title_recall(gold, retrieved, k=1) == 0.0
    assert supporting_title_recall(gold, retrieved, k=0) == 0.0
    assert supporting_title_recall(gold + ["Wayman Tisdale"], retrieved, k=2) == 0.5  # gold deduplicated
    assert supporting_title_recall([], retrieved) == 0.0
    assert supporting_title_recall(gold, []) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        supporting_title_recall(gold, retrieved, k=-1)


def test_all_gold_and_reciprocal_rank():
    gold = ["A", "B"]
    retrieved = ["X", "B", "Y", "A"]
    assert all_gold_at_k(gold, retrieved, k=3) == 0.0
    assert all_gold_at_k(gold, retrieved, k=4) == 1.0
    assert all_gold_at_k(gold, retrieved) == 1.0
    assert all_gold_at_k([], retrieved) == 0.0
    assert reciprocal_rank(gold, retrieved) == 0.5
    assert reciprocal_rank(gold, retrieved, k=1) == 0.0
    assert reciprocal_rank(["y"], retrieved) == pytest.approx(1 / 3)
    assert reciprocal_rank(gold, []) == 0.0


def test_paired_difference_counts_moves_and_brackets_the_mean():
    from apexdsp.metrics.paired import paired_by_id, paired_difference

    base = [0, 0, 1, 0, 1, 0, 0, 0, 1, 0] * 10
    new = [1, 0, 1, 1, 1, 0, 1, 0, 0, 0] * 10  # 3 wins, 1 loss per ten questions
    result = paired_difference(base, new, resamples=2000)
    assert (result.wins, result.losses, result.n) == (30, 10, 100)
    assert abs(result.difference - 0.2) < 1e-9 and result.base == 0.3 and result.new == 0.5
    assert result.low < 0.2 < result.high and result.significant
    same = paired_difference(base, base)
    assert same.difference == same.low == same.high == 0 and not same.significant
    noisy = paired_difference([0, 1, 0, 1], [1, 0, 1, 0])
    assert noisy.low < 0 < noisy.high and not noisy.significant
    assert paired_by_id({"a": 0, "b": 1, "c": 0}, {"b": 1, "c": 1, "d": 0}).n == 2
    with pytest.raises(ValueError, match="same questions"):
        paired_difference([1], [1, 0])
