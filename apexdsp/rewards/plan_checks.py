"""The retrieval-free parts of the decomposition reward: format, structure, placeholder use, gold agreement.

Each check scores one property of a plan in [0, 1], for one reason taken from the planning agents this
project reproduces:

* **format** (APEX-Searcher's format reward): the planner must write something the tolerant parser can
  use as it stands; every repair the parser had to make costs a little, a fallback costs everything.
* **structure** (OPERA's plan-quality signal): no step repeating another, no step that just restates the
  question, and about as many steps as the question has hops: a one-step plan for a two-hop question
  is no decomposition at all.
* **placeholder** (MuSiQue-style ``#n`` references, used by APEX and OPERA): a step that needs an earlier
  answer must say so with ``#n``, otherwise the executor cannot chain the hops; a comparison needs its
  entities looked up independently instead.
* **gold agreement** (where MuSiQue gives a gold decomposition): token F1 between the predicted and the
  gold sub-questions under the best one-to-one alignment.

Everything here is a pure function of a question record and a list of plan steps.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from apexdsp.data.records import Question
from apexdsp.metrics import f1
from apexdsp.programs.evidence import content_words
from apexdsp.programs.planner import PLACEHOLDER
from apexdsp.programs.trajectory import PlanIssue, PlanStepRecord

# What each parser repair costs the format score. Cosmetic repairs cost little; a broken reference or a
# cycle means the plan as written could not be executed.
ISSUE_PENALTIES: dict[str, float] = {
    "renumbered": 0.05, "reordered": 0.1, "duplicate_step": 0.3, "truncated": 0.3,
    "missing_reference": 0.4, "self_reference": 0.4, "cycle": 0.5,
}
# A plan that parsed, however repaired, keeps this much format credit: it still beats a fallback.
MIN_REPAIRED_FORMAT = 0.1
# Token Jaccard (stemmed content words plus ``#n``) at or above which two steps count as the same step.
NEAR_DUPLICATE_JACCARD = 0.7
# Share of the question's content words a step must hold to count as a mere restatement of the question.
TRIVIAL_QUESTION_COVERAGE = 0.9
# Token F1 a predicted step needs with its aligned gold step before that gold step's answer may fill it.
MIN_ALIGNMENT_F1 = 0.3

_SUFFIXES = ("ing", "ed", "er", "es", "s", "e")
_HOPS = re.compile(r"(\d)\s*hop", re.IGNORECASE)
_CHAINED_TYPES = {"bridge", "compositional", "inference"}


@dataclass(frozen=True)
class QuestionNeeds:
    """What a good plan for this question looks like: how many steps, how many chained, how many independent.

    ``links``: steps that must use an earlier answer (``#n``); ``roots``: steps that need none. ``None``
    when the question's type does not tell (the placeholder check is then skipped).
    """

    hops: int
    links: int | None
    roots: int | None
    basis: str


def question_needs(question: Question, max_steps: int) -> QuestionNeeds:
    """Expected plan shape, from the gold decomposition where there is one, else from the question type.

    MuSiQue: the gold steps themselves (a step writing ``#n`` is a link). HotpotQA ``bridge`` and
    2Wiki ``compositional``/``inference``: 2 steps, the second chained. ``comparison``: 2 independent
    lookups. 2Wiki ``bridge_comparison``: 4 steps, two chains of two. Unknown type: one step per
    supporting title (at least 2), shape unknown. The step count is capped at ``max_steps``.
    """
    gold = [step.question for step in question.decomposition or [] if step.question.strip()]
    kind = (question.type or "").strip().lower()
    if gold:
        links = sum(bool(PLACEHOLDER.search(text)) for text in gold)
        hops, roots, basis = len(gold), len(gold) - links, "gold decomposition"
    elif (match := _HOPS.search(kind)) is not None:
        hops = int(match.group(1))
        links, roots, basis = hops - 1, 1, f"type {kind}"
    elif kind in _CHAINED_TYPES:
        hops, links, roots, basis = 2, 1, 1, f"type {kind}"
    elif kind == "comparison":
        hops, links, roots, basis = 2, 0, 2, f"type {kind}"
    elif kind == "bridge_comparison":
        hops, links, roots, basis = 4, 2, 2, f"type {kind}"
    else:
        hops, links, roots = max(2, len(set(question.supporting_titles))), None, None
        basis = f"{len(set(question.supporting_titles))} supporting titles (type {kind or 'unknown'})"
    return QuestionNeeds(min(max(hops, 1), max_steps), links, roots, basis)


def format_score(issues: Sequence[PlanIssue], fallback: bool) -> tuple[float, list[str]]:
    """1 for a plan that parsed as written; less per repair; 0 for a fallback (nothing usable parsed)."""
    if fallback:
        return 0.0, ["format: no usable plan (fallback to the question itself)"]
    cost = sum(ISSUE_PENALTIES.get(issue.kind, 0.0) for issue in issues)
    notes = [f"format: repaired {issue.kind} ({issue.detail})" for issue in issues if issue.kind in ISSUE_PENALTIES]
    return (max(MIN_REPAIRED_FORMAT, 1.0 - cost) if cost else 1.0), notes


def _stem(word: str) -> str:
    """Strip common English suffixes until none is left ("served", "serve" -> "serv"; "composer",
    "composed" -> "compos"). A stemmer package is not in the stack (PyStemmer and NLTK are not
    installed), and comparing sub-questions needs no more."""
    while True:
        suffix = next((s for s in _SUFFIXES if word.endswith(s) and len(word) - len(s) >= 3), None)
        if suffix is None:
            return word
        word = word[: -len(suffix)]


def _fold(text: str) -> str:
    """Accents removed ("Aschenbrödel" -> "Aschenbrodel"): questions often drop the accents of titles."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def step_tokens(text: str) -> set[str]:
    """Stemmed content words plus ``#n`` markers: "When was #1 born?" and "When was #2 born?" stay apart."""
    return {_stem(word) for word in content_words(_fold(text))} | {f"#{n}" for n in PLACEHOLDER.findall(text)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def covers_question(step: set[str], question: set[str]) -> bool:
    """Whether a step restates the question: it holds nearly all of the question's content words. (Overlap
    alone is not enough: a legitimate first hop often repeats every entity and lacks only what is asked.)"""
    return bool(question) and len(step & question) / len(question) >= TRIVIAL_QUESTION_COVERAGE


def step_count_score(steps: int, hops: int) -> float:
    """1 at the expected count; one step for a multi-hop question scores 0; too few costs more than too many
    (a missing hop cannot be answered, an extra step only costs a search)."""
    if steps == hops:
        return 1.0
    if steps < hops:
        return 0.0 if steps <= 1 else steps / hops
    return max(0.0, 1.0 - 0.5 * (steps - hops) / hops)


def structure_score(question: Question, steps: Sequence[PlanStepRecord],
                    needs: QuestionNeeds) -> tuple[float, list[str]]:
    """Product of the step-count score (counting distinct steps only) and the shares of steps that are
    neither near-duplicates of an earlier step nor (in a plan of 2+ steps) a restatement of the question."""
    tokens = [step_tokens(step.question) for step in steps]
    question_tokens = step_tokens(question.question)
    redundant = [i + 1 for i in range(1, len(tokens))
                 if any(jaccard(tokens[i], tokens[j]) >= NEAR_DUPLICATE_JACCARD for j in range(i))]
    trivial = ([i + 1 for i, t in enumerate(tokens) if covers_question(t, question_tokens)]
               if len(steps) >= 2 else [])
    count = step_count_score(len(steps) - len(redundant), needs.hops)  # a repeated step is no extra hop
    n = max(len(steps), 1)
    score = count * (1 - len(redundant) / n) * (1 - len(trivial) / n)
    notes = [f"structure: {len(steps)} steps, expected {needs.hops} ({needs.basis})"]
    if redundant:
        notes.append(f"structure: steps {redundant} repeat an earlier step")
    if trivial:
        notes.append(f"structure: steps {trivial} restate the question")
    return score, notes


def placeholder_score(steps: Sequence[PlanStepRecord], needs: QuestionNeeds) -> tuple[float | None, list[str]]:
    """Chained hops must be written with ``#n``; independent lookups (comparisons) must exist as such.

    Two parts, averaged over those the question calls for: the share of the needed links present (steps
    whose text refers to an earlier step, capped by what the plan's length allows), and, when the
    question needs 2+ independent lookups, the share of those present (steps with no reference). ``None``
    when the question type does not say what is needed.
    """
    if needs.links is None or needs.roots is None:
        return None, [f"placeholder: not scored, the plan shape needed is unknown ({needs.basis})"]
    linked = [step.id for step in steps if any(int(n) < step.id for n in PLACEHOLDER.findall(step.question))]
    roots = len(steps) - len(linked)
    parts: list[float] = []
    if needs.links > 0:
        possible = min(needs.links, len(steps) - 1)
        parts.append(min(1.0, len(linked) / possible) if possible > 0 else 0.0)
    if needs.roots >= 2:
        parts.append(min(1.0, roots / needs.roots))
    note = (f"placeholder: {len(linked)} steps use an earlier answer, {roots} stand alone; "
            f"needed {needs.links} and {needs.roots} ({needs.basis})")
    return (sum(parts) / len(parts) if parts else 1.0), [note]


def _comparable(text: str) -> str:
    """A sub-question reduced for token F1: no ``#n``, no accents, stemmed words."""
    return " ".join(_stem(word) for word in re.findall(r"[^\W_]+", _fold(PLACEHOLDER.sub(" ", text)).lower()))


def align_to_gold(steps: Sequence[PlanStepRecord], question: Question) -> list[tuple[int, int, float]]:
    """Best one-to-one alignment of predicted to gold sub-questions by token F1 (``#n`` removed, accents
    folded, words stemmed first).

    Returns ``(predicted step id, gold step index, F1)`` for each aligned pair (Hungarian assignment,
    so it is the alignment with the highest total F1); empty without a gold decomposition.
    """
    gold = [step.question for step in question.decomposition or []]
    if not gold or not steps:
        return []
    scores = np.array([[f1(_comparable(step.question), _comparable(g)) for g in gold] for step in steps])
    rows, cols = linear_sum_assignment(scores, maximize=True)
    return [(steps[r].id, int(c), float(scores[r, c])) for r, c in zip(rows, cols)]


def gold_agreement_score(steps: Sequence[PlanStepRecord], question: Question,
                         alignment: list[tuple[int, int, float]]) -> tuple[float | None, list[str]]:
    """Total aligned F1 over the larger of the two step counts (missing and extra steps both cost);
    ``None`` without a gold decomposition."""
    gold = question.decomposition or []
    if not gold:
        return None, []
    score = sum(f for _, _, f in alignment) / max(len(steps), len(gold))
    pairs = ", ".join(f"{p}->{g + 1} ({f:.2f})" for p, g, f in alignment)
    return score, [f"gold_agreement: {len(steps)} steps vs {len(gold)} gold, aligned {pairs or 'none'}"]


def gold_fill_answers(question: Question, alignment: list[tuple[int, int, float]]) -> dict[int, str]:
    """Predicted step id -> the answer of the gold step it aligns with (F1 >= MIN_ALIGNMENT_F1 only), so a
    ``#n`` can be filled with the answer its step *would* have had (once the step's own search finds it)."""
    gold = question.decomposition or []
    return {pred: gold[g].answer for pred, g, score in alignment
            if score >= MIN_ALIGNMENT_F1 and gold[g].answer.strip()}
