"""Rewards wired to modules: a sampled completion -> the module's parsed outputs -> a reward.

Each module is trained on its own reward: the planner on the decomposition reward, a
query-writing step on the frozen-generator reward (the documents its queries find, read by a generator
it does not control), an answer-writing step on the answer reward. A :class:`ModuleReward` scores a
whole batch at once (the decomposition reward batches its searches), from the outputs the *same
adapter* parsed out of each completion, so the policy is judged on what the program would have read.

A completion that breaks the adapter's format is still parsed tolerantly (:class:`TolerantChatAdapter`
salvages what it can) and then scored by the reward's own rules: the decomposition reward scores an
unparseable plan 0 through its ``format`` component, and ``on_parse_failure`` on any module reward
replaces the score of a broken completion outright when set. A reward that raises or returns NaN is a
bug in the reward: :class:`RewardError` stops training with the module, reward and question named
(training on made-up numbers is worse than stopping).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from apexdsp.errors import ApexError
from apexdsp.indexes.base import Retriever
from apexdsp.metrics import answer_hit, f1
from apexdsp.programs.base import clean_answer
from apexdsp.programs.evidence import clean_query, evidence_pool
from apexdsp.programs.planner import split_items
from apexdsp.programs.question_forms import chosen_option, parse_options
from apexdsp.programs.trajectory import RetrievedPassage, Trajectory
from apexdsp.rewards.decomposition import completion_text
from apexdsp.rewards import (DecompositionWeights, FrozenGenerator, RewardResult, answer_reward,
                             decomposition_rewards, score_trajectory_with_frozen_generator)
from apexdsp.optimizers.module_prompts import ModulePrompt, reply_prefix


class RewardError(ApexError):
    """A module reward that raised or returned a non-finite value."""


class ModuleReward(Protocol):
    """``score(prompts, outputs, completions) -> one RewardResult per completion``.

    ``outputs`` are the adapter's parse of each completion (a dict of output fields);
    ``on_parse_failure``: the value a completion that broke the format gets (``None``: score the
    salvaged fields like any other).
    """

    name: str
    on_parse_failure: float | None

    def score(self, prompts: Sequence[ModulePrompt], outputs: Sequence[dict[str, Any]],
              completions: Sequence[str]) -> list[RewardResult]: ...


def _field(outputs: dict[str, Any], name: str) -> str:
    value = outputs.get(name)
    return value if isinstance(value, str) else ("" if value is None else str(value))


@dataclass
class DecompositionModuleReward:
    """Planner <- decomposition reward (format, structure, placeholders, retrieval-grounded executability)."""

    retriever: Retriever | None = None
    k: int = 5
    weights: DecompositionWeights | dict[str, float] | None = None
    max_steps: int = 3
    field: str = "plan"
    on_parse_failure: float | None = None
    name: str = "decomposition"

    def score(self, prompts, outputs, completions) -> list[RewardResult]:
        plans = [_field(out, self.field) for out in outputs]
        return decomposition_rewards([p.question for p in prompts], plans, retriever=self.retriever, k=self.k,
                                     weights=self.weights, max_steps=self.max_steps)


def gold_for_call(prompt: ModulePrompt) -> list[str]:
    """The answers a call's output is judged against: the question's own answers, or, for a sub-question
    (the executor's analysis-answer step), the answer of the MuSiQue gold step it matches best (token F1
    >= 0.5), since a sub-question's answer is rarely the final one."""
    question = prompt.question
    asked = str(prompt.inputs.get("question", question.question))
    if asked.strip() == question.question.strip() or not question.decomposition:
        return question.answers
    scored = [(f1(asked, step.question), step.answer) for step in question.decomposition if step.answer.strip()]
    best = max(scored, default=(0.0, ""))
    return [best[1]] if best[0] >= 0.5 else question.answers


@dataclass
class AnswerModuleReward:
    """Analysis-answer and final answer <- EM / F1 of the module's ``answer`` field (QAgent stage 1)."""

    kind: str = "f1"
    field: str = "answer"
    on_parse_failure: float | None = None
    name: str = "answer"

    def score(self, prompts, outputs, completions) -> list[RewardResult]:
        results = []
        for prompt, out in zip(prompts, outputs, strict=True):
            answers = gold_for_call(prompt)
            gold = prompt.question.model_copy(update={"answer": answers[0], "answer_aliases": answers[1:]})
            answer = _field(out, self.field)
            options = parse_options(prompt.inputs.get("options"))  # a choice call answers "A" or "B"
            if options is not None:
                answer = chosen_option(answer, options)
            results.append(answer_reward(gold, clean_answer(answer), self.kind))
        return results


@dataclass
class SearchModuleReward:
    """A query-writing step <- what a reader answers from the documents its queries retrieve.

    With ``reader=None`` the reader is a :class:`FrozenGenerator` over the untrained base model: the
    frozen-generator reward, EM + 0.5 * Hit (QAgent stage 2). With a ``reader`` (a ``FrozenGenerator``
    over the program's own reader LM) and ``kind`` "em"/"f1" it is the end-to-end answer reward of
    QAgent's stage 1. The written queries are parsed as the programs parse them (one per line, at most
    ``max_queries``); a query with no word in common with the question is dropped, not replaced by the
    question, so a useless completion finds nothing and scores 0.
    """

    retriever: Retriever
    reader: FrozenGenerator | None = None
    kind: str = "frozen"  # "frozen" (EM + 0.5 Hit), "em" or "f1"
    k: int = 5
    max_queries: int = 3
    field: str = "query"
    on_parse_failure: float | None = None
    name: str = "frozen_generator"

    def __post_init__(self) -> None:
        if self.kind not in ("frozen", "em", "f1"):
            raise ApexError(f"search reward kind must be frozen, em or f1, got {self.kind!r}")
        self.reader = self.reader or FrozenGenerator()

    def queries(self, prompt: ModulePrompt, text: str) -> list[str]:
        anchor = " ".join(str(v) for v in prompt.inputs.values())
        items = [item.text for item in split_items(text, questions_only=False)] or [text]
        queries = [clean_query(item, fallback="", anchor=anchor) for item in items]
        return list(dict.fromkeys(q for q in queries if q))[: self.max_queries]

    def score(self, prompts, outputs, completions) -> list[RewardResult]:
        trajectories = [Trajectory(program="grpo", question=p.question.question) for p in prompts]
        queries = [self.queries(p, _field(out, self.field)) for p, out in zip(prompts, outputs, strict=True)]
        flat = [(i, q) for i, qs in enumerate(queries) for q in qs]
        if flat:  # one batched search for the whole group of completions
            found = self.retriever.search_batch([q for _, q in flat], k=self.k)
            for (i, query), hits in zip(flat, found, strict=True):
                trajectories[i].queries.append(query)
                trajectories[i].retrieved.extend(
                    RetrievedPassage(pid=h.pid, title=h.title, text=h.text, score=h.score, query=query)
                    for h in hits)
        with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent reader calls batch in the local engine
            return list(pool.map(self._score_one, prompts, trajectories))

    def _score_one(self, prompt: ModulePrompt, trajectory: Trajectory) -> RewardResult:
        if self.kind == "frozen":
            return score_trajectory_with_frozen_generator(prompt.question, trajectory, self.reader)
        documents = [f"{p.title}: {p.text}" for p in evidence_pool(trajectory, self.reader.max_documents)]
        answer = self.reader(question=prompt.question.question, documents=documents).answer if documents else ""
        own = answer_reward(prompt.question, answer, self.kind)
        hit = answer_hit(prompt.question.answers, trajectory.retrieved_texts())
        return RewardResult(own.value, {**own.components, "hit": hit}, own.notes + [f"answer: {answer!r}"])


@dataclass
class CallableModuleReward:
    """A user's own reward: ``fn(question, outputs, completion) -> float | RewardResult`` per completion.

    ``question`` is the training example as a :class:`~apexdsp.data.records.Question` (``.question``,
    ``.answer``, ``.answers``, and the labels it carries, e.g. ``supporting_titles``); ``outputs`` the
    module's output fields as the program's adapter parsed them from the completion (``{"query": ...}``);
    ``completion`` the whole reply, prefilled header included. A :class:`RewardResult` has its components
    logged as well; a value that is not a finite number stops training (:class:`RewardError`).
    """

    fn: Callable[..., float | RewardResult]
    on_parse_failure: float | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or getattr(self.fn, "__name__", "custom")

    def score(self, prompts, outputs, completions) -> list[RewardResult | float]:
        """Plain numbers pass through as they are: :class:`TRLRewardFunction` rejects a non-finite one
        with the module and question named."""
        results: list[RewardResult | float] = []
        for prompt, out, text in zip(prompts, outputs, completions, strict=True):
            value = self.fn(prompt.question, out, text)
            results.append(value if isinstance(value, RewardResult) else float(value))
        return results


MODULE_REWARDS: dict[str, Callable[..., ModuleReward]] = {
    "decomposition": DecompositionModuleReward,
    "answer": AnswerModuleReward,
    "frozen_generator": lambda **options: SearchModuleReward(**{"kind": "frozen", **options}),
    "search_answer": lambda **options: SearchModuleReward(**{"kind": "f1", "name": "search_answer", **options}),
}

# Which reward trains which module by default; a program's own mapping overrides it.
DEFAULT_MODULE_REWARDS: dict[str, str] = {
    "planner.write_plan": "decomposition",
    "executor.write_query": "frozen_generator",
    "executor.rewrite": "frozen_generator",
    "executor.analyze": "answer",
    "answer_step.generate": "answer",
    "answer_step.decide": "answer",
    "answer_step.choose": "answer",
    "write_queries": "frozen_generator",
    "reader.generate": "answer",
    "reader.decide": "answer",
    "reader.choose": "answer",
}


def register_module_reward(name: str, factory: Callable[..., ModuleReward]) -> None:
    """Make ``factory(**options)`` available as reward ``name`` (a user's own module names its reward)."""
    if name in MODULE_REWARDS and MODULE_REWARDS[name] is not factory:
        raise ValueError(f"module reward {name!r} is registered twice")
    MODULE_REWARDS[name] = factory


def build_module_reward(reward: str | ModuleReward | Callable[..., Any], *, module: str = "",
                        output_field: str | None = None, **options: Any) -> ModuleReward:
    """A :class:`ModuleReward` from a registered name, an instance, or a plain per-completion function.

    ``output_field`` is the module's output field the reward reads, when its default does not exist.
    """
    if isinstance(reward, str):
        try:
            factory = MODULE_REWARDS[reward]
        except KeyError:
            raise ApexError(f"unknown module reward {reward!r} for {module or 'the module'}; "
                            f"known: {', '.join(sorted(MODULE_REWARDS))}") from None
        accepted = _parameters(factory)
        if output_field is not None and "field" not in options:
            options["field"] = output_field
        if accepted is not None:  # e.g. the answer reward takes no retriever
            options = {k: v for k, v in options.items() if k in accepted}
        try:
            return factory(**options)
        except TypeError as error:
            raise ApexError(f"reward {reward!r}: bad option ({error})") from None
    if hasattr(reward, "score"):
        return reward  # type: ignore[return-value]
    if callable(reward):
        return CallableModuleReward(reward, **{k: v for k, v in options.items() if k == "on_parse_failure"})
    raise ApexError(f"a reward must be a name, a ModuleReward or a function, got {type(reward).__name__}")


def _parameters(factory: Callable[..., Any]) -> set[str] | None:
    """The keyword names ``factory`` takes, or ``None`` when it takes any (``**options``)."""
    import inspect

    parameters = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


class TRLRewardFunction:
    """The reward function handed to ``trl.GRPOTrainer``: completions -> adapter parse -> module reward.

    TRL calls it with the batch's ``prompts`` and ``completions`` plus the dataset's extra columns as
    keyword lists (here ``example_index``, which points into ``prompts``) and a ``log_metric`` hook. It
    logs, per batch, the mean and spread of every reward component and the parse-failure rate (TRL
    averages them per logging step next to its own ``reward``, ``reward_std``, ``kl``...).
    """

    def __init__(self, reward: ModuleReward, prompts: Sequence[ModulePrompt], signature: Any, adapter: Any):
        self.reward = reward
        self.prompts = list(prompts)
        self.signature = signature
        self.adapter = adapter
        self.__name__ = reward.name  # TRL names the reward's metrics after it

    def parse(self, completion: str) -> tuple[dict[str, Any], bool]:
        """The adapter's parse of one completion, and whether it had to repair the format."""
        from apexdsp.lm.adapter import record_parse_failures

        with record_parse_failures() as log:
            outputs = self.adapter.parse(self.signature, completion)
        return outputs, bool(log.failures)

    def __call__(self, prompts: list, completions: list, example_index: list[int], log_metric=None,
                 **_: Any) -> list[float]:
        calls = [self.prompts[int(i)] for i in example_index]
        # TRL returns what the model wrote after a prefilled header; the adapter parses the whole reply.
        texts = [reply_prefix(call.messages) + (completion_text(c) or "") for call, c in zip(calls, completions)]
        parsed = [self.parse(text) for text in texts]
        try:
            results = self.reward.score(calls, [out for out, _ in parsed], texts)
        except RewardError:
            raise
        except Exception as error:  # a reward bug: stop with the module and question named
            raise RewardError(f"reward {self.reward.name!r} raised on module {calls[0].module!r} "
                              f"(question {calls[0].question.id}): {type(error).__name__}: {error}") from error
        if len(results) != len(texts):
            raise RewardError(f"reward {self.reward.name!r} returned {len(results)} values "
                              f"for {len(texts)} completions")
        values = []
        for call, (_, failed), result in zip(calls, parsed, results, strict=True):
            value = result.value if isinstance(result, RewardResult) else float(result)
            if not math.isfinite(value):
                raise RewardError(f"reward {self.reward.name!r} returned {value} on module {call.module!r} "
                                  f"(question {call.question.id}); a reward must be a finite number")
            values.append(self.reward.on_parse_failure if failed and self.reward.on_parse_failure is not None
                          else value)
        if log_metric is not None:
            self._log(log_metric, results, [failed for _, failed in parsed])
        return values

    def _log(self, log_metric, results: Sequence[RewardResult], failed: list[bool]) -> None:
        names = sorted({name for r in results if isinstance(r, RewardResult) for name in r.components})
        for name in names:
            values = [r.components[name] for r in results if isinstance(r, RewardResult) and name in r.components]
            mean = sum(values) / len(values)
            log_metric(f"components/{name}/mean", mean)
            log_metric(f"components/{name}/std", math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))
        log_metric("parse_failure_rate", sum(failed) / max(len(failed), 1))


__all__ = ["AnswerModuleReward", "CallableModuleReward", "DEFAULT_MODULE_REWARDS", "DecompositionModuleReward",
           "MODULE_REWARDS", "ModuleReward", "RewardError", "SearchModuleReward", "build_module_reward",
           "TRLRewardFunction", "gold_for_call", "register_module_reward"]
