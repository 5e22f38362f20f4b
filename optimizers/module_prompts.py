"""A module's own training prompts: its inputs on training questions, formatted exactly as DSPy sends them.

Weight-level training must see the very prompt the module will be called with after training, or the
policy learns a task it never performs: same instructions, same bootstrapped demos, same field layout.
So prompts are built by the adapter that runs the program (``adapter.format(signature, demos, inputs)``
-> chat messages), rendered by the tokenizer's chat template exactly as the local engine renders them at
inference and handed to the trainer as that text (:func:`trainer_prompt`; checked against TRL's own
tokenization, token for token, in ``tests/test_grpo.py``).

A module's inputs come from running the program on training questions with DSPy's trace on (what the
upstream modules actually produce, with their current prompts and weights: that is what "earlier modules
frozen" means in MAPGRPO). A module whose only input is the question itself (a planner) needs no run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from apexdsp.data.records import Question
from apexdsp.errors import ApexError
from apexdsp.lm.adapter import TolerantChatAdapter
from apexdsp.tracking.run import write_json_atomic

logger = logging.getLogger(__name__)


@dataclass
class ModulePrompt:
    """One call of a module: the question it served, the module's inputs, and the chat messages sent."""

    module: str
    question: Question
    inputs: dict[str, Any]
    messages: list[dict[str, str]]
    context: dict[str, Any] = field(default_factory=dict)  # e.g. the sub-goal step a call served

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "question": self.question.model_dump(), "inputs": self.inputs,
                "messages": self.messages, "context": self.context}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModulePrompt:
        return cls(module=data["module"], question=Question.model_validate(data["question"]),
                   inputs=data["inputs"], messages=data["messages"], context=data.get("context", {}))


def find_predictor(program: dspy.Module, module: str) -> tuple[str, dspy.Predict]:
    """The predictor called ``module`` (``planner.write_plan``), or the only predictor of sub-module
    ``module`` (``planner``). An unknown name lists the program's predictors."""
    predictors = dict(program.named_predictors())
    name = resolve_module(list(predictors), module)
    return name, predictors[name]


def resolve_module(predictor_names: Sequence[str], module: str) -> str:
    """The predictor name ``module`` stands for among ``predictor_names``: itself, or the only one inside
    it. Experiment specs check their stages with this before any work is done."""
    if module in predictor_names:
        return module
    inside = [name for name in predictor_names if name.startswith(f"{module}.")]
    if len(inside) == 1:
        return inside[0]
    if inside:
        raise ApexError(f"module {module!r} has {len(inside)} predictors ({', '.join(inside)}); name one of them")
    raise ApexError(f"program has no module {module!r}; its predictors are: {', '.join(predictor_names)}")


def current_adapter() -> Any:
    """The adapter the program runs with (``dspy.settings.adapter``), else apexdsp's tolerant one."""
    return dspy.settings.adapter or TolerantChatAdapter()


def format_messages(predictor: dspy.Predict, inputs: dict[str, Any], adapter: Any = None,
                    lm: Any = None) -> list[dict[str, str]]:
    """The chat messages DSPy sends for ``predictor(**inputs)``: system, demos, the user turn, and the
    prefilled start of the reply where the adapter writes one for the predictor's LM."""
    adapter = adapter or current_adapter()
    lm = lm or predictor.lm or dspy.settings.lm
    if hasattr(adapter, "format_call"):  # apexdsp's TolerantChatAdapter
        return adapter.format_call(predictor.signature, list(predictor.demos), dict(inputs), lm)
    return adapter.format(predictor.signature, list(predictor.demos), dict(inputs))


def reply_text(predictor: dspy.Predict, outputs: dict[str, Any], adapter: Any = None, lm: Any = None) -> str:
    """The whole reply (prefilled header in) the LM must write for ``outputs``, as the engine decodes it.

    Usually the adapter's format of the outputs. A typed yes/no or A/B call is different: after the
    prefilled header the engine decodes one constrained token (:func:`apexdsp.lm.adapter.choice_constraint`),
    read at the position right after the header, so its reply is the header followed by the choice itself;
    trained on the adapter's format instead, the model would learn the choice one token later, where the
    engine never reads it.
    """
    from apexdsp.lm.adapter import choice_constraint

    adapter = adapter or current_adapter()
    lm = lm or predictor.lm or dspy.settings.lm
    prefix = adapter.reply_prefix(predictor.signature, lm) if hasattr(adapter, "reply_prefix") else ""
    if prefix and choice_constraint(predictor.signature, lm):
        (field,) = predictor.signature.output_fields
        return prefix + str(outputs[field])
    return adapter.format_assistant_message_content(predictor.signature, dict(outputs))


def reply_prefix(messages: list[dict[str, str]]) -> str:
    """The prefilled start of the reply (a final assistant message), "" when the prompt opens a new turn."""
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""


def chat_prompt_text(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The prompt text the model reads: the tokenizer's chat template, with the assistant turn opened or,
    when the messages end in a prefilled reply, continued (as the engine and TRL render it)."""
    from apexdsp.lm.engine import template_mode

    return tokenizer.apply_chat_template(messages, tokenize=False, **template_mode(messages))


def trainer_prompt(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The prompt as a trainer must be handed it so that it reads the ids the engine sends.

    TRL renders a conversational prompt with ``add_generation_prompt=True``, which closes a prefilled reply
    (``[[ ## plan ## ]]``) and opens a new assistant turn: a prompt the module never sees. A text prompt is
    tokenized as it is, so the rendered text (reply continued, :func:`chat_prompt_text`) is handed over
    instead; a tokenizer that adds a BOS of its own gets the text without the template's, so that BOS is
    not doubled.
    """
    text = chat_prompt_text(messages, tokenizer)
    bos = tokenizer.bos_token
    adds_special = tokenizer("a")["input_ids"] != tokenizer("a", add_special_tokens=False)["input_ids"]
    if adds_special and bos and text.startswith(bos):
        text = text[len(bos):]
    return text


def _as_question(item: Any) -> Question:
    if isinstance(item, Question):
        return item
    if isinstance(item, dspy.Example):  # apexdsp.data.examples.to_example's labels
        data = dict(item.toDict())
        data.setdefault("id", hashlib.sha1(str(data.get("question")).encode()).hexdigest()[:12])
        return Question.model_validate(data)
    if isinstance(item, dict):
        return Question.model_validate(item)
    raise ApexError(f"a training item must be a Question record or a dspy.Example, got {type(item).__name__}")


def as_questions(trainset: list[Any]) -> list[Question]:
    """Training items (``Question`` records or ``dspy.Example`` from ``to_example``) as records."""
    return [_as_question(item) for item in trainset]


class ModulePromptCollector:
    """Collects one module's prompts from training questions.

    ``max_per_question`` bounds how many calls of the module one question contributes (an executor step
    runs once per sub-goal and rewrite); ``direct`` decides whether a module whose inputs are only the
    question is prompted without running the program (``None``: whenever that is possible).
    """

    def __init__(self, module: str, *, max_per_question: int = 2, direct: bool | None = None,
                 adapter: Any = None, progress: bool = True, threads: int = 8):
        self.module = module
        self.max_per_question = max_per_question
        self.direct = direct
        self.adapter = adapter
        self.progress = progress
        self.threads = threads  # concurrent program runs: the local engine batches their LM calls

    def collect(self, program: dspy.Module, trainset: list[Any]) -> list[ModulePrompt]:
        name, predictor = find_predictor(program, self.module)
        questions = as_questions(trainset)
        adapter = self.adapter or current_adapter()
        only_question = set(predictor.signature.input_fields) == {"question"}
        direct = only_question if self.direct is None else self.direct
        if direct and not only_question:
            raise ApexError(f"module {name!r} takes {list(predictor.signature.input_fields)}: its inputs come "
                            "from earlier modules, so they must be collected by running the program")
        calls_of = ([[{"question": q.question}] for q in questions] if direct
                    else self._traced_inputs(program, predictor, questions, name))
        prompts: list[ModulePrompt] = []
        for question, calls in zip(questions, calls_of, strict=True):
            for inputs in calls[: self.max_per_question]:
                prompts.append(ModulePrompt(name, question, inputs, format_messages(predictor, inputs, adapter)))
        if not prompts:
            raise ApexError(f"module {name!r} was never called on the {len(questions)} training questions: "
                            "nothing to train on")
        return prompts

    def _traced_inputs(self, program: dspy.Module, predictor: dspy.Predict, questions: list[Question],
                       name: str) -> list[list[dict]]:
        """The inputs of every call of ``predictor`` while the program answers each question (in threads)."""
        from apexdsp.optimizers.rollouts import run_traced

        examples = [dspy.Example(question=q.question).with_inputs("question") for q in questions]
        rollouts = run_traced(program, examples, threads=self.threads, progress=self.progress)
        failed = [r for r in rollouts if r.error]
        if failed:
            logger.warning("collect %s: the program raised on %d of %d questions (first: %s); their calls are "
                           "not used", name, len(failed), len(rollouts), failed[0].error)
        return [[dict(inputs) for called, inputs, _ in r.trace if called is predictor] for r in rollouts]


def prompts_key(module: str, trainset: list[Question], program: dspy.Module) -> str:
    """Fingerprint of what a prompt file was collected from: module, question ids, the module's prompt."""
    _, predictor = find_predictor(program, module)
    state = json.dumps(predictor.dump_state(), sort_keys=True, default=str)
    ids = ",".join(q.id for q in trainset)
    return hashlib.sha256(f"{module}|{ids}|{state}".encode()).hexdigest()[:16]


def save_prompts(path: Path, prompts: list[ModulePrompt], key: str) -> None:
    """Write prompts as one JSON file (atomically), with the fingerprint they were collected under."""
    write_json_atomic({"key": key, "prompts": [p.to_json() for p in prompts]}, path)


def load_prompts(path: Path, key: str) -> list[ModulePrompt] | None:
    """The prompts saved at ``path`` if they were collected under ``key``; ``None`` otherwise."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("key") != key:
        logger.info("%s was collected for another module state or trainset: collecting again", path)
        return None
    return [ModulePrompt.from_json(item) for item in data["prompts"]]


__all__ = ["ModulePrompt", "ModulePromptCollector", "as_questions", "chat_prompt_text", "current_adapter",
           "find_predictor", "format_messages", "load_prompts", "prompts_key", "reply_prefix", "save_prompts",
           "trainer_prompt"]
