"""Module calls rebuilt from training annotations: what a correct program would have sent and answered.

A 135M model rarely completes a multi-hop run correctly on its own, so fine-tuning on its own successful
traces leaves little to learn from. The data sets say what a correct run looks like instead: HotpotQA and
2WikiMultihopQA give the answer and the supporting paragraphs, MuSiQue each sub-question with its answer.
For a module to train, each call it would receive is rebuilt with the program's own settings and the real
index (the gold passage is not always retrieved, nor on top, so the module learns to read under retrieval
noise), formatted by the adapter exactly as at inference, and paired with the annotated target. A call is
kept only where what the prompt shows supports its target (the answer occurs in it); every dropped record
is counted by reason.

Which calls can be rebuilt is decided by the module object that owns the predictor (apexdsp's own module
classes, by identity, never by a signature's name):

* :class:`~apexdsp.programs.answer.PassageReader` ``.generate`` (rag's reader, QAgent's): the question and
  the top passages searched with it -> the gold answer; ``.decide`` (yes/no questions) -> ``yes``/``no``;
  ``.choose`` ("X or Y" questions whose gold answer is one of the two options) -> that option's letter.
  The closed forms' targets are judgements, not spans, so no passage has to contain them;
* :class:`~apexdsp.programs.executor.Executor` ``.analyze``: a sub-question (MuSiQue's, with ``#n`` filled
  by the gold sub-answers; else the whole question as a one-step plan) and the passages searched with it
  -> its answer, ``answered: yes``;
* :class:`~apexdsp.programs.answer.AnswerStep` ``.generate`` (APEX, OPERA): the question, the findings
  of a gold decomposition and the passages its sub-questions retrieve -> the gold answer. Without a
  decomposition (HotpotQA, 2WikiMultihopQA) the plan is one step, the question itself, as the planner
  writes it when it does not decompose: the finding is the gold answer, kept only where the passages that
  search retrieves show it (a correct executor read it there); ``.decide`` and ``.choose`` take the closed
  forms over the same one-step findings, whose sub-answer is the top passage's title (an executor's
  answer to a closed question names an entity, never the judgement), so the judgement comes from the
  passages;
* :class:`~apexdsp.programs.planner.Planner` ``.write_plan``: the question -> its gold decomposition
  written as the planner writes plans (MuSiQue; no search, so nothing to check it against).

Yes/no and "X or Y" questions go to the typed predictors at inference, so the open predictors skip them
and the typed ones take only them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy

from apexdsp.data.records import Question
from apexdsp.errors import ApexError
from apexdsp.metrics.answer import answer_hit, normalize_answer
from apexdsp.optimizers.module_prompts import as_questions, current_adapter, format_messages, reply_text
from apexdsp.optimizers.sft_examples import SFTExample
from apexdsp.programs.answer import AnswerStep, PassageReader
from apexdsp.programs.evidence import format_passages, fuse
from apexdsp.programs.executor import Executor, findings_text
from apexdsp.programs.planner import Planner
from apexdsp.programs.question_forms import choice_options, format_options, is_yes_no_question
from apexdsp.programs.trajectory import SubGoalRecord


@dataclass
class AnnotatedReport:
    """What was kept (per module and question type) and dropped (per module and reason)."""

    kept: Counter = field(default_factory=Counter)  # (module, question type) -> calls
    dropped: Counter = field(default_factory=Counter)  # (module, reason) -> records

    def summary(self) -> dict[str, Any]:
        return {"kept": {f"{m}/{d}": n for (m, d), n in sorted(self.kept.items())},
                "dropped": {f"{m}/{r}": n for (m, r), n in sorted(self.dropped.items())}}

    def why_none(self, module: str) -> str:
        reasons = {r: n for (m, r), n in self.dropped.items() if m == module}
        return ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])) or "no records"


@dataclass
class _Call:
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    support: str | None  # the text that must contain the answer (None: a call with no answer to support)


Synthesizer = Callable[[Any, Any, Question], "tuple[list[_Call], str | None]"]


def _open_question(question: Question) -> bool:
    return choice_options(question.question) is None and not is_yes_no_question(question.question)


def _search(retriever: Any, queries: Sequence[str], k: int) -> list[list[Any]]:
    return [list(hits) for hits in retriever.search_batch(list(queries), k=k)]


def _reader_passages(program: Any, reader: PassageReader, question: Question, retriever: Any) -> str:
    k = getattr(getattr(program, "config", None), "k", 5)
    return format_passages(_search(retriever, [question.question], k)[0], reader.passage_chars)


def _one_step_inputs(program: Any, step: AnswerStep, question: Question, retriever: Any,
                     sub_answer: Callable[[list[Any]], str]) -> dict[str, str]:
    """The answer step's ``findings`` and ``passages`` after a one-step plan (the question itself, searched
    as it is), the finding's answer chosen by ``sub_answer(hits)``."""
    config = getattr(program, "config", None)
    hits = _search(retriever, [question.question], getattr(config, "k", 5))[0]
    passages = format_passages(fuse([hits], getattr(config, "answer_passages", 5)), step.passage_chars)
    record = SubGoalRecord(step=1, question=question.question, filled=question.question,
                           answer=sub_answer(hits), answered=True)
    return {"findings": findings_text([record]), "passages": passages}


def _top_title(hits: list[Any]) -> str:
    return hits[0].title if hits else "unknown"


def _reader_calls(program: Any, reader: PassageReader, question: Question, retriever: Any):
    if not _open_question(question):
        return [], "closed form (typed predictors)"
    passages = _reader_passages(program, reader, question, retriever)
    return [_Call({"question": question.question, "passages": passages}, {"answer": question.answer},
                  passages)], None


def _evidence(program: Any, owner: Any, question: Question, retriever: Any) -> dict[str, str]:
    """The evidence fields a typed predictor of ``owner`` reads: the reader's passages, or the answer step's
    one-step findings and passages."""
    if isinstance(owner, AnswerStep):
        return _one_step_inputs(program, owner, question, retriever, _top_title)
    return {"passages": _reader_passages(program, owner, question, retriever)}


def _decide_calls(program: Any, owner: Any, question: Question, retriever: Any):
    if not is_yes_no_question(question.question):
        return [], "not a yes/no question"
    gold = normalize_answer(question.answer)
    if gold not in ("yes", "no"):
        return [], "yes/no question with another answer"
    inputs = {"question": question.question, **_evidence(program, owner, question, retriever)}
    return [_Call(inputs, {"answer": gold}, None)], None


def _choose_calls(program: Any, owner: Any, question: Question, retriever: Any):
    options = choice_options(question.question)
    if options is None:
        return [], "not an X-or-Y question"
    golds = {normalize_answer(a) for a in [question.answer, *question.answer_aliases]}
    letters = [letter for letter, option in zip("AB", options) if normalize_answer(option) in golds]
    if len(letters) != 1:
        return [], "gold answer not one of the two options"
    inputs = {"question": question.question, "options": format_options(options),
              **_evidence(program, owner, question, retriever)}
    return [_Call(inputs, {"answer": letters[0]}, None)], None


_PLACEHOLDER = re.compile(r"#(\d+)")


def filled_steps(question: Question) -> list[tuple[str, str]]:
    """A gold decomposition's (sub-question, answer) pairs with ``#n`` replaced by step ``n``'s answer."""
    steps = question.decomposition or []
    answers = [step.answer for step in steps]

    def fill(match: re.Match) -> str:
        index = int(match.group(1)) - 1
        return answers[index] if 0 <= index < len(answers) else match.group(0)

    return [(" ".join(_PLACEHOLDER.sub(fill, step.question).split()), step.answer) for step in steps]


def _analyze_calls(program: Any, executor: Executor, question: Question, retriever: Any):
    steps = filled_steps(question)
    if not steps:
        if not _open_question(question):
            return [], "closed form without a decomposition"
        steps = [(question.question, question.answer)]  # a one-step plan: the question itself
    found = _search(retriever, [sub for sub, _ in steps], executor.k)
    calls = []
    for (sub, answer), hits in zip(steps, found, strict=True):
        passages = format_passages(hits, executor.passage_chars)
        source = next((hit.title for hit in hits if answer_hit(answer, f"{hit.title} {hit.text}")), "the passages")
        calls.append(_Call({"question": sub, "passages": passages},
                           {"answer": answer, "answered": "yes", "analysis": f"{source} gives the answer."},
                           passages))
    return calls, None


def _answer_step_calls(program: Any, step: AnswerStep, question: Question, retriever: Any):
    if not _open_question(question):
        return [], "closed form (typed predictors)"
    steps = filled_steps(question)
    if not steps:  # a one-step plan: the finding is the gold answer, read from the passages shown
        inputs = _one_step_inputs(program, step, question, retriever, lambda hits: question.answer)
        return [_Call({"question": question.question, **inputs}, {"answer": question.answer},
                      inputs["passages"])], None
    config = getattr(program, "config", None)
    found = _search(retriever, [sub for sub, _ in steps], getattr(config, "k", 5))
    passages = format_passages(fuse(found, getattr(config, "answer_passages", 5)), step.passage_chars)
    records = [SubGoalRecord(step=i, question=sub, filled=sub, answer=answer, answered=True)
               for i, (sub, answer) in enumerate(steps, start=1)]
    findings = findings_text(records)
    return [_Call({"question": question.question, "findings": findings, "passages": passages},
                  {"answer": question.answer}, f"{findings}\n{passages}")], None


def _planner_calls(program: Any, planner: Planner, question: Question, retriever: Any):
    from apexdsp.optimizers.demos import gold_plan_text

    if not question.decomposition:
        return [], "no decomposition"
    plan = gold_plan_text(question)
    if plan is None or len(question.decomposition) > planner.max_steps:
        return [], "decomposition not writable as a plan"
    return [_Call({"question": question.question}, {"plan": plan}, None)], None


# (owner module class, predictor attribute) -> how its calls are rebuilt
SYNTHESIZERS: dict[tuple[type, str], Callable[..., tuple[list[_Call], str | None]]] = {
    (PassageReader, "generate"): _reader_calls,
    (PassageReader, "decide"): _decide_calls,
    (PassageReader, "choose"): _choose_calls,
    (Executor, "analyze"): _analyze_calls,
    (AnswerStep, "generate"): _answer_step_calls,
    (AnswerStep, "decide"): _decide_calls,
    (AnswerStep, "choose"): _choose_calls,
    (Planner, "write_plan"): _planner_calls,
}


def owner_of(program: dspy.Module, predictor_name: str) -> tuple[Any, str]:
    """The module object holding predictor ``a.b.generate`` (``program.a.b``) and its attribute name."""
    *path, attribute = predictor_name.split(".")
    owner = program
    for part in path:
        owner = getattr(owner, part, None)
    return owner, attribute


def synthesizer_for(program: dspy.Module, predictor_name: str):
    """How ``predictor_name``'s calls are rebuilt from annotations; an :class:`ApexError` names the ones
    that can be, when this one cannot."""
    owner, attribute = owner_of(program, predictor_name)
    for (kind, name), synthesize in SYNTHESIZERS.items():
        if isinstance(owner, kind) and attribute == name:
            return synthesize
    known = ", ".join(f"{kind.__name__}.{name}" for kind, name in SYNTHESIZERS)
    raise ApexError(f"predictor {predictor_name!r} has no calls to rebuild from annotations (known: {known}); "
                    "train it on the program's own traces instead (SFT source 'traces')")


def annotated_examples(program: dspy.Module, trainset: list[Any], predictors: dict[str, dspy.Predict], *,
                       retriever: Any, adapter: Any = None,
                       report: AnnotatedReport | None = None) -> list[SFTExample]:
    """SFT examples for ``predictors`` (``{name: predictor}`` of ``program``) from ``trainset``'s annotations,
    retrieved with ``retriever``; ``report`` (if given) receives the counts."""
    if retriever is None:
        raise ApexError("SFT from annotations searches the index as the program does: give the compile an index")
    adapter = adapter or current_adapter()
    report = report if report is not None else AnnotatedReport()
    owners = {name: owner_of(program, name)[0] for name in predictors}
    synthesizers = {name: synthesizer_for(program, name) for name in predictors}
    examples: list[SFTExample] = []
    for question in as_questions(trainset):
        kind = question.type or "untyped"
        for name, predictor in predictors.items():
            calls, skipped = synthesizers[name](program, owners[name], question, retriever)
            if skipped:
                report.dropped[(name, skipped)] += 1
            for call in calls:
                if call.support is not None and not answer_hit(call.outputs.get("answer", ""), call.support):
                    report.dropped[(name, "answer not in the prompt")] += 1
                    continue
                completion = reply_text(predictor, call.outputs, adapter)
                examples.append(SFTExample(name, format_messages(predictor, call.inputs, adapter), completion,
                                           question.id, 1.0, source="annotated"))
                report.kept[(name, kind)] += 1
    return examples


__all__ = ["AnnotatedReport", "SYNTHESIZERS", "annotated_examples", "filled_steps", "owner_of", "synthesizer_for"]
