"""From traces to demonstrations: which runs are good, and which module calls inside them are worth showing.

A rollout (one training question run with tracing on) is judged twice. :func:`judge_rollouts` applies the
trace gate (was the run good?) and computes the decomposition reward of its plan; :func:`extract_demos`
then applies each module's own gate to every ``Predict`` call in a passing run and turns the calls that
pass into demos.

The trace gate is the user's metric when there is one, by DSPy's rule (``BootstrapFewShot``): a run is
good when ``metric(example, prediction, trace)`` is truthy, or at least ``metric_threshold``. Without a
metric it is :class:`~apexdsp.optimizers.config.DemoGates`' answer F1 or, where the program records the
passages it retrieved (an apexdsp ``Trajectory``), whether they hold the gold answer. A gate whose input
the program does not record is not applied (and the compile reports it): it never rejects a run for it.
Whatever the trace gate says, a call whose output is junk (a template echo, no word at all) is never a demo.

A demo's outputs are the module's outputs *as the program used them*: the planner's plan as parsed and
renumbered (``1. ... 2. ... #1``), a query as it was searched, an answer as it was cleaned. The raw text
of a 135M model is often the same content wrapped in noise; showing the noise would teach it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy

from apexdsp.data.records import Question
from apexdsp.indexes.base import Retriever
from apexdsp.metrics import answer_hit, normalize_answer
from apexdsp.metrics.retrieval import normalize_title
from apexdsp.optimizers.config import DemoGates
from apexdsp.optimizers.rollouts import Rollout
from apexdsp.programs.answer import AnswerFromFindings, AnswerFromPassages, DecideFromFindings, DecideFromPassages
from apexdsp.programs.base import clean_answer
from apexdsp.programs.evidence import clean_query, is_non_answer, parse_yes_no, strip_echo
from apexdsp.programs.executor import AnalyzeAnswer, RewriteQuery, WriteQuery
from apexdsp.programs.planner import WritePlan, parse_plan
from apexdsp.programs.qagent import WriteQueries, parse_queries
from apexdsp.programs.reflector import Reflect
from apexdsp.rewards import RewardResult, answer_reward, decomposition_rewards, frozen_generator_reward

logger = logging.getLogger(__name__)

Metric = Callable[[dspy.Example, Any, Any], Any]  # DSPy's metric(example, prediction, trace) -> float | bool


@dataclass
class TraceVerdict:
    """Whether one rollout passed the trace gate, on what ground, with the rewards computed for it."""

    example_id: str
    passed: bool
    reason: str  # the ground it passed on ("f1", "hit") or why it failed
    em: float = 0.0
    f1: float = 0.0
    hit: float | None = None  # None: the program records no retrieved passages
    plan: RewardResult | None = None
    metric: float | None = None  # the user's metric, when it judged the run

    @property
    def score(self) -> float:
        """How good the run was, to rank demos that have no module reward of their own: the user's metric,
        else the frozen-generator formula applied to the program's own answer (F1 + 0.5 * Hit)."""
        return self.metric if self.metric is not None else self.f1 + 0.5 * (self.hit or 0.0)


@dataclass
class Demo:
    """A demonstration for one predictor, with the reward that ranked it and where it came from."""

    predictor: str
    signature: str
    example: dspy.Example
    score: float
    example_id: str
    rewards: dict[str, float] = field(default_factory=dict)


def _plan_input(rollout: Rollout) -> Any:
    """What the decomposition reward scores: the trajectory (plan + sub-answers), else the raw completion."""
    if rollout.trajectory is not None:
        return rollout.trajectory
    step = next((s for s in rollout.trace if _is(s[0], WritePlan)), None)
    return None if step is None else getattr(step[2], "plan", None)


def _has_planner(rollout: Rollout) -> bool:
    return any(_is(step[0], WritePlan) for step in rollout.trace)


def metric_name(metric: Metric | None) -> str:
    return getattr(metric, "__name__", type(metric).__name__) if metric is not None else ""


def metric_value(result: Any) -> float:
    """A metric's result as a number: a bool, a number, or a ``dspy.Prediction`` with a ``score`` (as DSPy's
    feedback metrics return); anything else counts by its truth."""
    value = getattr(result, "score", result)
    try:
        return float(value)
    except (TypeError, ValueError):
        return float(bool(value))


def metric_gate(metric: Metric, rollout: Rollout, threshold: float | None = None) -> tuple[bool, float | None, str]:
    """DSPy's rule: ``(passed, value, reason)`` for ``metric(example, prediction, trace)``: passed when the
    value is truthy, or at least ``threshold`` when one is given. One that raises or returns NaN fails the
    run; the reason says so."""
    name = metric_name(metric)
    try:
        number = metric_value(metric(rollout.example, rollout.prediction, rollout.trace))
    except Exception as error:  # noqa: BLE001 - a metric bug costs its run, and is counted by reason
        return False, None, f"metric {name} raised {type(error).__name__}"
    if not math.isfinite(number):
        return False, None, f"metric {name} returned {number}"
    passed = number >= threshold if threshold is not None else bool(number)
    return passed, number, "metric" if passed else (f"metric {name} < {threshold}" if threshold is not None
                                                    else f"metric {name} false")


def judge_rollouts(rollouts: Sequence[Rollout], gates: DemoGates, retriever: Retriever | None = None, *,
                   metric: Metric | None = None, metric_threshold: float | None = None) -> list[TraceVerdict]:
    """The trace gate for every rollout (``metric`` when given, else ``gates``), and the decomposition reward
    of each plan (searched in one batch)."""
    planned = [r for r in rollouts if r.error is None and _has_planner(r)]
    plan_rewards = dict(zip(map(id, planned), decomposition_rewards(
        [r.question for r in planned], [_plan_input(r) for r in planned], retriever=retriever,
        k=gates.reward_k, weights=gates.decomposition_weights, max_steps=gates.plan_max_steps))) if planned else {}
    verdicts = []
    for rollout in rollouts:
        # A program that caught its own failure (apexdsp programs never raise) recorded it in the trajectory.
        error = rollout.error or next(iter(rollout.trajectory.errors if rollout.trajectory else []), None)
        if error is not None:
            verdicts.append(TraceVerdict(rollout.question.id, False, f"error: {error.split(':')[0]}"))
            continue
        scores = answer_reward(rollout.question, rollout.answer, "f1").components
        hit = None
        if rollout.trajectory is not None and rollout.trajectory.retrieved:
            hit = frozen_generator_reward(rollout.question, rollout.trajectory.retrieved_texts(),
                                          rollout.answer).components["hit"]
        plan = plan_rewards.get(id(rollout))
        if metric is not None:
            passed, value, reason = metric_gate(metric, rollout, metric_threshold)
            verdicts.append(TraceVerdict(rollout.question.id, passed, reason, scores["em"], scores["f1"], hit, plan,
                                         value))
            continue
        if scores["f1"] >= gates.min_answer_f1 and (has_answer(rollout) or not gates.min_answer_f1):
            # (0 accepts every run that finished)
            reason = "f1"
        elif gates.accept_hit and hit:
            reason = "hit"
        elif not has_answer(rollout):
            reason = "no answer field in the prediction"
        else:
            reason = f"answer F1 < {gates.min_answer_f1}" + (
                "" if not gates.accept_hit else " and gold answer not retrieved" if hit is not None
                else " (retrieval not recorded by the program)")
        verdicts.append(TraceVerdict(rollout.question.id, reason in ("f1", "hit"), reason, scores["em"],
                                     scores["f1"], hit, plan))
    return verdicts


def has_answer(rollout: Rollout) -> bool:
    """Whether the program's prediction has an ``answer`` the default trace gate can score."""
    return rollout.prediction is not None and getattr(rollout.prediction, "answer", None) is not None


def _signature(predictor: Any) -> Any:
    return getattr(predictor, "signature", None)


def _is(predictor: Any, signature: type) -> bool:
    """Whether a predictor runs ``signature`` (by class, or by name after a state reload re-created it; a
    user's own signature that happens to share the name is not apexdsp's and gets the generic gate)."""
    own = _signature(predictor)
    if own is None:
        return False
    try:
        if issubclass(own, signature):
            return True
    except TypeError:
        return False
    ours = str(getattr(own, "__module__", "")).startswith(("apexdsp.", "dspy."))
    return ours and getattr(own, "__name__", None) == signature.__name__


def query_writers(program: dspy.Module) -> list[str]:
    """The predictors of ``program`` that write search queries with apexdsp's signatures (their demos are
    gated on finding a gold paragraph)."""
    return [name for name, predictor in program.named_predictors()
            if any(_is(predictor, kind) for kind in (WriteQuery, RewriteQuery, WriteQueries))]


def _fields(predictor: Any, kind: str, values: Any) -> dict[str, Any]:
    names = getattr(_signature(predictor), f"{kind}_fields", {}) or {}
    source = values if isinstance(values, dict) else {name: getattr(values, name, None) for name in names}
    return {name: source.get(name) for name in names if source.get(name) is not None}


@dataclass
class _Judged:
    """A module call's gate result: passed, its ranking score, the outputs to show, reward components, and
    why it was turned down (empty: the module's gate, by its signature's name)."""

    passed: bool
    score: float
    outputs: dict[str, Any]
    rewards: dict[str, float]
    why: str = ""


def echoes_template(predictor: Any, outputs: dict) -> bool:
    """Whether an output repeats the adapter's field template (``{question}``) instead of filling it: a
    small LM copies it from the system message, and the program's fallbacks hide that from the trace gate."""
    names = {*(getattr(_signature(predictor), "input_fields", {}) or {}),
             *(getattr(_signature(predictor), "output_fields", {}) or {})}
    return any(f"{{{name}}}" in str(value) for value in outputs.values() for name in names)


_HEADER_ECHO = re.compile(r"\[\[\s*##|##\s*\]\]")
_WORD = re.compile(r"[^\W_]")


def junk_output(predictor: Any, outputs: dict) -> str | None:
    """Why a call's outputs must never be shown or imitated, or ``None``: a field that repeats the adapter's
    template instead of filling it (``{question}``, a ``[[ ## answer ## ]]`` header) or that has no letter or
    digit at all (``[#]`` lines, ``]]]]``), as a small LM writes when it loses the format. An empty field is
    left to the module's own gate (a reflector's follow-up may be empty)."""
    if echoes_template(predictor, outputs):
        return "template echo"
    for value in outputs.values():
        text = "" if value is None else str(value).strip()
        if _HEADER_ECHO.search(text):
            return "template echo"
        if text and not _WORD.search(text):
            return "no words"
    return None


def _judge_call(predictor: Any, inputs: dict, outputs: dict, rollout: Rollout, verdict: TraceVerdict,
                gates: DemoGates, first_plan: bool) -> _Judged:
    trace_rewards = {"answer_f1": verdict.f1, "answer_em": verdict.em, **({"hit": verdict.hit}
                                                                         if verdict.hit is not None else {})}
    junk = junk_output(predictor, outputs)
    if junk is not None:
        return _Judged(False, 0.0, outputs, {}, f"junk output ({junk})")
    if _is(predictor, WritePlan):
        parsed = parse_plan(outputs.get("plan"), str(inputs.get("question", "")), max_steps=gates.plan_max_steps)
        reward = verdict.plan if first_plan else None
        if parsed.fallback or reward is None:
            return _Judged(False, 0.0, outputs, {})
        return _Judged(reward.value >= gates.min_plan_reward, reward.value, {**outputs, "plan": parsed.plan.render()},
                       {"decomposition": reward.value, **reward.components})
    if _is(predictor, WriteQuery) or _is(predictor, RewriteQuery):
        question = str(inputs.get("question", ""))
        query = clean_query(outputs.get("query"), fallback=question)
        if _is(predictor, RewriteQuery) and query.lower() == str(inputs.get("failed_query", "")).strip().lower():
            return _Judged(False, 0.0, outputs, {})  # "a different query" that is the same teaches nothing
        found = _query_found_gold(query, rollout)
        if found is None or not gates.require_query_hit:
            return _Judged(True, verdict.score, {**outputs, "query": query}, trace_rewards)
        return _Judged(bool(found), verdict.score + found, {**outputs, "query": query},
                       {**trace_rewards, "query_hit": found}, "" if found else "query found no gold paragraph")
    if _is(predictor, WriteQueries):  # QAgent: the queries the program would take from this output
        anchor = f"{inputs.get('question', '')} {inputs.get('plan', '')}"
        queries = parse_queries(str(outputs.get("queries") or ""), [], [], limit=3, anchor=anchor)
        if not queries:  # nothing usable: the round ran on the fallbacks (sub-questions, the question)
            return _Judged(False, 0.0, outputs, {})
        found = [f for f in (_query_found_gold(q, rollout) for q in queries) if f is not None]
        hit = max(found) if found else None
        shown = {**outputs, "queries": "\n".join(queries)}
        if hit is None or not gates.require_query_hit:
            return _Judged(True, verdict.score, shown, trace_rewards)
        return _Judged(bool(hit), verdict.score + hit, shown, {**trace_rewards, "query_hit": hit})
    if _is(predictor, AnalyzeAnswer):
        answer = strip_echo(clean_answer(outputs.get("answer")))
        said = parse_yes_no(outputs.get("answered"))
        usable = bool(answer) and not is_non_answer(answer) and said is not False
        extractive = answer_hit(answer, str(inputs.get("passages", ""))) if usable else 0.0
        passed = usable and (extractive > 0 or not gates.require_extractive_analysis)
        analysis = " ".join(str(outputs.get("analysis") or "").split())[:300]
        return _Judged(passed, verdict.score + extractive,
                       {**outputs, "answer": answer, "answered": "yes", "analysis": analysis},
                       {**trace_rewards, "extractive": extractive})
    if any(_is(predictor, kind) for kind in (AnswerFromFindings, AnswerFromPassages, DecideFromFindings,
                                              DecideFromPassages)):
        answer = strip_echo(clean_answer(outputs.get("answer")))
        scored = answer_reward(rollout.question, answer, "f1").components
        rewards = {"answer_f1": scored["f1"], "answer_em": scored["em"]}
        if scored["f1"] >= gates.min_final_answer_f1 and scored["f1"] > 0:
            return _Judged(True, scored["f1"], {**outputs, "answer": answer}, rewards)
        if gates.label_answers_from_evidence and _gold_in_view(rollout, inputs):
            return _Judged(True, 1.0, {**outputs, "answer": rollout.question.answer}, {**rewards, "labeled": 1.0})
        return _Judged(False, scored["f1"], outputs, rewards)
    if _is(predictor, Reflect):
        enough = parse_yes_no(outputs.get("enough"))
        follow_up = str(outputs.get("follow_up") or "").strip()
        usable = enough is True or (enough is False and bool(follow_up))
        return _Judged(usable, verdict.score, {**outputs, "enough": "yes" if enough else "no",
                                               "follow_up": "" if enough else follow_up}, trace_rewards)
    # Any other predictor (a user's own): a demo with an empty output is a completion the adapter lost.
    names = list(getattr(_signature(predictor), "output_fields", {}) or outputs)
    empty = [name for name in names if not str(outputs.get(name) or "").strip()]
    return _Judged(not empty, verdict.score, outputs, trace_rewards, f"empty {', '.join(empty)}" if empty else "")


def _gold_in_view(rollout: Rollout, inputs: dict) -> bool:
    """Whether the gold answer is grounded in what the answer step was shown (a yes/no answer always is:
    it cannot appear in passages, and it is still the right output for the question)."""
    gold = normalize_answer(rollout.question.answer)
    if not gold:
        return False
    if gold in ("yes", "no"):
        return True
    return bool(answer_hit(rollout.question.answers, " ".join(str(v) for v in inputs.values())))


def _query_found_gold(query: str, rollout: Rollout) -> float | None:
    """1.0 / 0.0: whether the passages searched with ``query`` include a gold title; None if unknown."""
    trajectory = rollout.trajectory
    gold = {normalize_title(t) for t in rollout.question.supporting_titles}
    if trajectory is None or not gold:
        return None
    titles = {normalize_title(p.title) for p in trajectory.retrieved if p.query == query}
    return float(bool(titles & gold))


def extract_demos(rollout: Rollout, verdict: TraceVerdict, predictor_names: dict[int, str], gates: DemoGates,
                  reasons: dict[str, int] | None = None) -> tuple[list[Demo], dict[str, int]]:
    """At most one demo per predictor from a passing rollout (the best-scored call of a multi-use module).

    Returns the demos and, per predictor, how many of its calls the module gate rejected; ``reasons``, when
    given, counts the rejections by ``"<predictor>: <why>"``.
    """
    best: dict[str, Demo] = {}
    rejected: dict[str, int] = {}
    if not verdict.passed:
        return [], rejected
    seen_plan = False
    for predictor, inputs, outputs in rollout.trace:
        name = predictor_names.get(id(predictor))
        if name is None:  # a predictor outside the program (a frozen generator, a reward model)
            continue
        first_plan = _is(predictor, WritePlan) and not seen_plan
        seen_plan = seen_plan or _is(predictor, WritePlan)
        judged = _judge_call(predictor, _fields(predictor, "input", inputs), _fields(predictor, "output", outputs),
                             rollout, verdict, gates, first_plan)
        if not judged.passed:
            rejected[name] = rejected.get(name, 0) + 1
            if reasons is not None:
                why = judged.why or f"{getattr(_signature(predictor), '__name__', '?')} gate"
                reasons[f"{name}: {why}"] = reasons.get(f"{name}: {why}", 0) + 1
            continue
        if name not in best or judged.score > best[name].score:
            example = dspy.Example(augmented=True, **_fields(predictor, "input", inputs), **judged.outputs)
            best[name] = Demo(name, getattr(_signature(predictor), "__name__", "?"), example, judged.score,
                              verdict.example_id, judged.rewards)
    return list(best.values()), rejected


def gold_plan_text(question: Question) -> str | None:
    """A gold decomposition (MuSiQue) written the way the planner writes plans; ``None`` when its steps are
    knowledge-base relations ("Bubye River >> country") rather than questions a planner should write."""
    steps = [" ".join(step.question.split()) for step in question.decomposition or []]
    if not steps or any(">>" in step or not step for step in steps):
        return None
    return "\n".join(f"{i}. {step}" for i, step in enumerate(steps, start=1))


def labeled_plan_demos(questions: Sequence[Question], planner_names: Sequence[str], gates: DemoGates,
                       max_steps: int = 3) -> tuple[list[Demo], int]:
    """Planner demos from gold decompositions (DSPy's *labeled* demos, for the one module that has labels).

    Each gold plan must pass the same decomposition gate as a bootstrapped plan. Its executability is not
    scored: its supporting paragraphs belong to its own benchmark's corpus, not to the index being compiled
    for, so the reward is renormalised over format, structure, placeholders and gold agreement. Returns the
    demos (one per planner predictor and question) and how many gold plans the gate turned down.
    """
    usable = [(q, text) for q in questions if (text := gold_plan_text(q)) and len(q.decomposition or []) <= max_steps]
    parsed = [parse_plan(text, q.question, max_steps=max_steps) for q, text in usable]
    rewards = decomposition_rewards([q for q, _ in usable], parsed, retriever=None,
                                    weights=gates.decomposition_weights, max_steps=gates.plan_max_steps)
    demos, rejected = [], len(questions) - len(usable)
    for (question, _), plan, reward in zip(usable, parsed, rewards):
        if plan.fallback or plan.issues or reward.value < gates.min_plan_reward:
            rejected += 1
            continue
        for name in planner_names:
            example = dspy.Example(augmented=True, question=question.question, plan=plan.plan.render())
            demos.append(Demo(name, "WritePlan", example, reward.value, f"gold:{question.id}",
                              {"decomposition": reward.value, **reward.components}))
    return demos, rejected


__all__ = ["Demo", "Metric", "TraceVerdict", "extract_demos", "gold_plan_text", "has_answer", "judge_rollouts",
           "junk_output", "labeled_plan_demos", "metric_gate", "metric_name", "metric_value", "query_writers"]
