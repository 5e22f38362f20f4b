"""The planner (APEX planner, OPERA plan agent): question → an ordered list of sub-goals.

A plan is a list of sub-questions; ``#n`` in a sub-question stands for the answer of step ``n`` (as in
MuSiQue's gold decompositions), which makes the dependencies explicit. The LM writes the plan as numbered
lines because a 135M-parameter model can write a list far more reliably than JSON; :func:`parse_plan` then
turns whatever came back into a valid :class:`Plan`. Small models break formats, so the parser repairs what
it can (bullets instead of numbers, duplicate steps, references to missing steps, cycles, steps out of
order) and otherwise falls back to a one-step plan: the question itself. Every repair is returned as a
:class:`PlanIssue`, because rewards and reports need to see how often the planner fails.
"""

from __future__ import annotations

import graphlib
import heapq
import json
import re
from dataclasses import dataclass, field
from typing import Any

import dspy
from pydantic import BaseModel, Field, model_validator

from apexdsp.programs.trajectory import PlanIssue, PlanRecord, PlanStepRecord

PLACEHOLDER = re.compile(r"#(\d+)")
_HEADER = re.compile(r"\[\[\s*##\s*\w+\s*##\s*\]\]")
_NUMBERED = re.compile(
    r"^(?:(?:step|sub-?question|sub-?goal|question|q)\s*)?#?(\d{1,2})\s*[.):\]-]\s*(.+)$", re.IGNORECASE)
_BRACKETED = re.compile(r"^\[(\d{1,2})\]\s*(.+)$")
_INLINE_NUMBER = re.compile(r"(?<=[?.!])\s+(?=(?:step\s*)?\d{1,2}[.):]\s)", re.IGNORECASE)
_BULLET = re.compile(r"^[-*•+]\s+(.+)$")
_ANNOTATION = re.compile(r"\(\s*(?:uses|using|depends\s+on|needs|after|from|requires)\s*:?\s*([^)]*)\)",
                         re.IGNORECASE)
_WORD = re.compile(r"[^\W_]+")


class SubGoal(BaseModel):
    """One step: a sub-question, whose ``#n`` placeholders are the answers of the steps it depends on."""

    id: int = Field(ge=1)
    question: str = Field(min_length=1)
    depends_on: list[int] = Field(default_factory=list)


class Plan(BaseModel):
    """Steps numbered 1..n in an executable order: every dependency is an earlier step."""

    steps: list[SubGoal] = Field(min_length=1)

    @model_validator(mode="after")
    def _executable(self) -> Plan:
        for position, step in enumerate(self.steps, start=1):
            if step.id != position:
                raise ValueError(f"step {position} has id {step.id}; ids must be 1..n in order")
            bad = [d for d in step.depends_on if not 1 <= d < step.id]
            if bad:
                raise ValueError(f"step {step.id} depends on {bad}: only earlier steps may be referenced")
            for ref in PLACEHOLDER.findall(step.question):
                if int(ref) not in step.depends_on:
                    raise ValueError(f"step {step.id} refers to #{ref} but does not depend on it")
        return self

    @classmethod
    def single(cls, question: str) -> Plan:
        """The fallback plan: the question itself as the only step."""
        return cls(steps=[SubGoal(id=1, question=question.strip() or "?")])

    def render(self) -> str:
        """The plan as numbered lines, the format the planner is asked to write."""
        return "\n".join(f"{step.id}. {step.question}" for step in self.steps)

    def to_record(self, *, raw: str = "", round: int = 0, source: str = "planner",
                  issues: list[PlanIssue] | None = None, fallback: bool = False) -> PlanRecord:
        steps = [PlanStepRecord(**step.model_dump()) for step in self.steps]
        return PlanRecord(round=round, source=source, raw=raw, steps=steps, issues=list(issues or []),
                          fallback=fallback)


@dataclass
class PlanParse:
    """What :func:`parse_plan` made of a completion: a valid plan and the repairs it took."""

    plan: Plan
    issues: list[PlanIssue] = field(default_factory=list)
    fallback: bool = False


@dataclass
class _Item:
    label: int | None
    text: str
    deps: set[int] = field(default_factory=set)  # labels named in an annotation like "(uses #1)"


def parse_plan(text: str | None, question: str, max_steps: int = 3) -> PlanParse:
    """Turn an LM's plan into a valid :class:`Plan`, repairing it where possible.

    Accepts numbered lines (``1.``, ``1)``, ``Step 1:``, ``[1]``), bullets, bare lines, a single line of
    several questions, or JSON (a list of strings or of ``{"question", "depends_on"}`` objects). Falls
    back to :meth:`Plan.single` when nothing usable is found.
    """
    issues: list[PlanIssue] = []
    items = _json_items(text or "") or split_items(text or "")
    items = [item for item in items if _is_step(item.text)]
    if not items:
        shown = (text or "").strip()[:80]
        issues.append(PlanIssue(kind="unparseable", detail=f"no steps in {shown!r}" if shown else "empty plan"))
        issues.append(PlanIssue(kind="fallback_one_step", detail="the question is the only step"))
        return PlanParse(Plan.single(question), issues, fallback=True)

    steps, label_to_position = _number(items, issues)
    if len(steps) > max_steps:
        issues.append(PlanIssue(kind="truncated", detail=f"{len(steps)} steps, kept {max_steps}"))
        steps = steps[:max_steps]
    deps = _resolve_references(steps, label_to_position, issues)
    _break_cycles(steps, deps, issues)
    plan = _ordered_plan(steps, deps, issues)
    return PlanParse(plan, issues)


def split_items(text: str, questions_only: bool = True) -> list[_Item]:
    """Split a list the LM wrote into items (plans, the reflector's follow-ups, QAgent's queries).

    Numbered or bulleted lines are items; without any, each line is one, but with ``questions_only``
    only lines holding a question mark are (prose is not a plan).
    """
    text = _INLINE_NUMBER.sub("\n", _HEADER.sub("\n", text))  # "1. A? 2. B?" on one line
    lines = [_clean_line(line) for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("```")]
    marked: list[_Item] = []
    for line in lines:
        match = _NUMBERED.match(line) or _BRACKETED.match(line)
        if match:
            marked.append(_item(int(match.group(1)), match.group(2)))
        elif (bullet := _BULLET.match(line)) is not None:
            marked.append(_item(None, bullet.group(1)))
    if marked:
        return marked
    if len(lines) == 1 and lines[0].count("?") > 1:  # "Who directed X? When was #1 born?"
        lines = [part.strip() + "?" for part in lines[0].split("?") if part.strip()]
    return [_item(None, line) for line in lines if "?" in line or not questions_only]


def _is_step(text: str) -> bool:
    """At least two words, and not a lead-in such as "The sub-questions are:"."""
    return len(_WORD.findall(PLACEHOLDER.sub("", text))) >= 2 and not text.rstrip().endswith(":")


def _clean_line(line: str) -> str:
    line = line.strip().replace("**", "").strip()
    return re.sub(r"^(?:plan|sub-?questions?)\s*:\s*", "", line, flags=re.IGNORECASE).strip()


def _item(label: int | None, text: str) -> _Item:
    deps: set[int] = set()
    for annotation in _ANNOTATION.findall(text):
        deps.update(int(n) for n in re.findall(r"\d+", annotation))
    text = _ANNOTATION.sub("", text).strip().strip("\"'`").strip()
    return _Item(label, text, deps)


def _json_items(text: str) -> list[_Item]:
    stripped = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    if not stripped.startswith(("[", "{")):
        return []
    try:
        data: Any = json.loads(stripped)
    except json.JSONDecodeError:
        return []
    if isinstance(data, dict):
        data = next((data[key] for key in ("steps", "plan", "sub_questions", "subquestions") if key in data), [])
    items: list[_Item] = []
    for entry in data if isinstance(data, list) else []:
        if isinstance(entry, str):
            items.append(_item(None, entry))
        elif isinstance(entry, dict):
            text_value = next((entry[k] for k in ("question", "sub_question", "subquestion", "q", "text")
                               if isinstance(entry.get(k), str)), "")
            label = entry.get("id", entry.get("step"))
            deps = entry.get("depends_on", entry.get("dependencies", entry.get("deps", [])))
            item = _item(label if isinstance(label, int) else None, text_value)
            if isinstance(deps, list):
                item.deps.update(int(str(d).lstrip("#")) for d in deps if str(d).lstrip("#").isdigit())
            items.append(item)
    return items


def _number(items: list[_Item], issues: list[PlanIssue]) -> tuple[list[_Item], dict[int, int]]:
    """Drop duplicate steps and map the labels the LM wrote to positions 1..n."""
    kept: list[_Item] = []
    seen: dict[str, int] = {}
    label_to_position: dict[int, int] = {}
    labels = [item.label for item in items]
    if any(label is not None for label in labels) and labels != list(range(1, len(items) + 1)):
        issues.append(PlanIssue(kind="renumbered", detail=f"labels {labels} became 1..n"))
    for index, item in enumerate(items, start=1):
        key = " ".join(_WORD.findall(item.text.lower()))
        label = item.label if item.label is not None else index
        if key in seen:
            issues.append(PlanIssue(kind="duplicate_step", detail=f"{item.text!r} repeats step {seen[key]}"))
            label_to_position.setdefault(label, seen[key])
            continue
        kept.append(item)
        seen[key] = len(kept)
        label_to_position.setdefault(label, len(kept))
    return kept, label_to_position


def _resolve_references(steps: list[_Item], label_to_position: dict[int, int],
                        issues: list[PlanIssue]) -> dict[int, set[int]]:
    """Rewrite ``#label`` as ``#position``; drop references to missing steps and to the step itself."""
    deps: dict[int, set[int]] = {}
    for position, item in enumerate(steps, start=1):
        own: set[int] = set()

        def rewrite(match: re.Match, position: int = position, own: set[int] = own) -> str:
            target = label_to_position.get(int(match.group(1)))
            if target is None or target > len(steps):
                issues.append(PlanIssue(kind="missing_reference", detail=f"step {position}: {match.group(0)}"))
                return ""
            if target == position:
                issues.append(PlanIssue(kind="self_reference", detail=f"step {position}: {match.group(0)}"))
                return ""
            own.add(target)
            return f"#{target}"

        item.text = re.sub(r"\s{2,}", " ", PLACEHOLDER.sub(rewrite, item.text)).strip()
        for label in item.deps:
            target = label_to_position.get(label)
            if target is None or target > len(steps) or target == position:
                issues.append(PlanIssue(kind="missing_reference", detail=f"step {position}: uses {label}"))
            else:
                own.add(target)
        deps[position] = own
    return deps


def _break_cycles(steps: list[_Item], deps: dict[int, set[int]], issues: list[PlanIssue]) -> None:
    """Remove one dependency of each cycle (a reference to a later step), with its placeholder."""
    while True:
        try:
            graphlib.TopologicalSorter(deps).prepare()
            return
        except graphlib.CycleError as error:
            cycle: list[int] = error.args[1]  # [a, b, ..., a]: each node is a dependency of the next
            edges = [(after, before) for before, after in zip(cycle, cycle[1:])]  # (step, what it uses)
            step, target = next(((s, t) for s, t in edges if t > s), edges[-1])
            deps[step].discard(target)
            steps[step - 1].text = re.sub(rf"\s*#{target}(?!\d)", "", steps[step - 1].text).strip()
            issues.append(PlanIssue(kind="cycle", detail=f"{' -> '.join(map(str, cycle))}: "
                                                         f"dropped step {step}'s use of #{target}"))


def _ordered_plan(steps: list[_Item], deps: dict[int, set[int]], issues: list[PlanIssue]) -> Plan:
    """Order the steps so that dependencies come first (stable: written order where possible)."""
    waiting = {position: set(d) for position, d in deps.items()}
    ready = [position for position, d in waiting.items() if not d]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        position = heapq.heappop(ready)
        order.append(position)
        for other, needs in waiting.items():
            if position in needs:
                needs.discard(position)
                if not needs:
                    heapq.heappush(ready, other)
    if order != sorted(order):
        issues.append(PlanIssue(kind="reordered", detail=f"executed in order {order}"))
    new_id = {old: new for new, old in enumerate(order, start=1)}
    sub_goals = []
    for old in order:
        question = PLACEHOLDER.sub(lambda m: f"#{new_id[int(m.group(1))]}", steps[old - 1].text)
        sub_goals.append(SubGoal(id=new_id[old], question=question, depends_on=sorted(new_id[d] for d in deps[old])))
    return Plan(steps=sub_goals)


class WritePlan(dspy.Signature):
    """Break the question into at most 3 simple sub-questions, one per line, numbered 1., 2., 3.
    Write #1 for the answer of sub-question 1."""

    question: str = dspy.InputField()
    plan: str = dspy.OutputField(desc="e.g. 1. Who directed Jaws? 2. When was #1 born?")


class Planner(dspy.Module):
    """``question -> Plan`` with one LM call and the tolerant parser; never raises on a bad completion."""

    def __init__(self, max_steps: int = 3, max_tokens: int = 96):
        super().__init__()
        self.max_steps = max_steps
        self.write_plan = dspy.Predict(WritePlan, max_tokens=max_tokens)

    def forward(self, question: str, round: int = 0) -> dspy.Prediction:
        raw = self.write_plan(question=question).plan or ""
        parsed = parse_plan(raw, question, max_steps=self.max_steps)
        record = parsed.plan.to_record(raw=raw, round=round, issues=parsed.issues, fallback=parsed.fallback)
        return dspy.Prediction(plan=parsed.plan, record=record)


def plan_from_questions(questions: list[str], first_id: int = 1) -> list[SubGoal]:
    """Independent sub-goals numbered from ``first_id`` (follow-ups proposed by a reflection)."""
    return [SubGoal(id=first_id + offset, question=q) for offset, q in enumerate(questions)]


__all__ = ["PLACEHOLDER", "Plan", "PlanParse", "Planner", "SubGoal", "WritePlan", "parse_plan",
           "plan_from_questions", "split_items"]
