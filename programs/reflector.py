"""The reflector (QAgent's reflection): is the evidence enough, and if not, what to look for next.

After a round of sub-goals (APEX) or searches (QAgent) the reflector reads the question and what was found
and says *enough: yes/no*; on *no* it proposes new sub-questions or queries for another round. Its output is
parsed tolerantly: a missing yes/no is inferred from whether follow-ups were proposed, follow-ups that repeat
what was already asked are dropped, and a *no* without a usable follow-up ends the loop (noted), because
another round with nothing new to search would only repeat itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import dspy

from apexdsp.programs.evidence import parse_yes_no
from apexdsp.programs.planner import PLACEHOLDER, split_items
from apexdsp.programs.trajectory import ReflectionRecord


class Reflect(dspy.Signature):
    """Are the findings enough to answer the question? If not, write up to 2 new short questions to search,
    one per line."""

    question: str = dspy.InputField()
    findings: str = dspy.InputField()
    enough: str = dspy.OutputField(desc="yes or no")
    follow_up: str = dspy.OutputField(desc="new questions, one per line; empty if enough")


def _key(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def parse_reflection(enough: str | None, follow_up: str | None, *, asked: Iterable[str], round: int,
                     max_follow_ups: int) -> ReflectionRecord:
    """Turn the reflector's two fields into a decision, dropping follow-ups that were already asked."""
    said = parse_yes_no(enough)
    seen = {_key(text) for text in asked}
    follow_ups: list[str] = []
    for item in split_items(follow_up or ""):
        text = " ".join(PLACEHOLDER.sub("", item.text).split())
        if len(text.split()) < 2 or _key(text) in seen or parse_yes_no(text) is not None and len(text.split()) < 3:
            continue
        seen.add(_key(text))
        follow_ups.append(text)
    follow_ups = follow_ups[:max_follow_ups]
    notes = []
    if said is None:
        notes.append(f"enough unreadable ({(enough or '').strip()[:40]!r}): "
                     + ("follow-ups proposed, read as no" if follow_ups else "no follow-ups, read as yes"))
        said = not follow_ups
    if not said and not follow_ups:
        notes.append("not enough, but no new question proposed: stop")
    return ReflectionRecord(round=round, enough=said or not follow_ups, follow_ups=[] if said else follow_ups,
                            note="; ".join(notes))


class Reflector(dspy.Module):
    """``(question, findings) -> reflection`` (a :class:`ReflectionRecord`) with one LM call."""

    def __init__(self, max_follow_ups: int = 2, max_tokens: int = 64):
        super().__init__()
        self.max_follow_ups = max_follow_ups
        self.reflect = dspy.Predict(Reflect, max_tokens=max_tokens)

    def forward(self, question: str, findings: str, asked: Iterable[str] = (), round: int = 0) -> dspy.Prediction:
        result = self.reflect(question=question, findings=findings)
        record = parse_reflection(result.enough, result.follow_up, asked=[question, *asked], round=round,
                                  max_follow_ups=self.max_follow_ups)
        return dspy.Prediction(reflection=record)
