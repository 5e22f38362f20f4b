"""Answer metrics: exact match, token F1 and answer Hit, with the HotpotQA/SQuAD normalisation.

:func:`normalize_answer` is the official HotpotQA/SQuAD ``normalize_answer`` (lowercase, drop ASCII
punctuation, drop the articles *a*, *an*, *the*, collapse whitespace) applied to the NFC form of the
text. On NFC text (every file of ``shared/data``) it gives exactly what the official script gives.

Why not DSPy's ``dspy.evaluate.metrics.normalize_text``: DSPy 3.4.1 puts Unicode **NFD** in front of
the same steps. NFD splits an accented letter into base letter + combining mark, the mark is not a
word character, so the article regex then sees a lone ``a`` or ``the`` and deletes it: ``"María"``
becomes ``"marí"``, ``"Dvořák"`` becomes the two tokens ``"dvoř ́k"``, ``"Théâtre"`` becomes
``"́ ̂tre"``. That changes F1 on accented names, so DSPy's ``em``/``f1_score``/``hotpot_f1_score``
(which call it) are not reused either; the token F1 below is the same formula. NFC keeps what NFD was
for (a precomposed and a decomposed ``é`` compare equal) without the damage.

What the standard normalisation does with tricky input (see ``tests/test_metrics.py``):

* accents are kept: ``"café"`` and ``"cafe"`` differ;
* only ASCII punctuation goes: curly quotes and dashes (``’ “ – —``) stay, so ``"don’t"`` and
  ``"don't"`` differ;
* punctuation inside numbers goes too: ``"1,000"`` equals ``"1000"``, and ``"1.5"`` becomes ``"15"``.

One deliberate departure from the official script: a gold answer that normalises to nothing
(``""``, ``"the"``, ``"?"``) is no answer and scores 0 for every prediction. The official script
gives an empty prediction EM 1 against an empty gold, which a policy trained on the reward could
exploit.

Every scoring function takes the gold side as one string or a list of aliases and returns the best
score over the aliases, as a float in [0, 1].
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable

__all__ = ["normalize_answer", "exact_match", "f1", "answer_hit"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SPECIAL = frozenset({"yes", "no", "noanswer"})


def normalize_answer(text: str) -> str:
    """HotpotQA/SQuAD normalisation of the NFC form: lower, no ASCII punctuation, no articles, single spaces."""
    text = unicodedata.normalize("NFC", text).lower().translate(_DROP_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _gold_forms(answers: str | Iterable[str]) -> list[str]:
    """Normalised gold aliases, without duplicates and without the ones that normalise to nothing."""
    if isinstance(answers, str):
        answers = [answers]
    forms: list[str] = []
    for answer in answers:
        form = normalize_answer(answer)
        if form and form not in forms:
            forms.append(form)
    return forms


def exact_match(prediction: str, answers: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold alias, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(predicted in _gold_forms(answers))


def _token_f1(predicted: str, gold: str) -> float:
    """HotpotQA's F1 of two normal forms: yes/no/noanswer must match exactly, otherwise token overlap."""
    if (predicted in _SPECIAL or gold in _SPECIAL) and predicted != gold:
        return 0.0
    predicted_tokens, gold_tokens = predicted.split(), gold.split()
    same = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: str | Iterable[str]) -> float:
    """Token F1 of the normalised prediction against the best gold alias.

    HotpotQA's rule holds: when either side is ``yes``, ``no`` or ``noanswer`` and the two differ, the
    score is 0, so "yes it is" earns nothing against "yes".
    """
    predicted = normalize_answer(prediction)
    return max((_token_f1(predicted, gold) for gold in _gold_forms(answers)), default=0.0)


def answer_hit(answers: str | Iterable[str], texts: str | Iterable[str]) -> float:
    """1.0 if a normalised gold alias occurs as a whole-token run in one of the normalised texts.

    Used for retrieval ("does a retrieved passage contain the answer?") and for lenient answer
    scoring. Whole tokens: ``"Paris"`` hits ``"in Paris, France"`` but not ``"Parisian"``. A gold
    answer that normalises to nothing never hits.
    """
    golds = _gold_forms(answers)
    if not golds:
        return 0.0
    if isinstance(texts, str):
        texts = [texts]
    # Normal forms are single-space separated, so padding with spaces turns a token-run search
    # into a substring search.
    padded_golds = [f" {gold} " for gold in golds]
    for text in texts:
        padded_text = f" {normalize_answer(text)} "
        if any(gold in padded_text for gold in padded_golds):
            return 1.0
    return 0.0
