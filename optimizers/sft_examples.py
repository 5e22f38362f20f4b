"""SFT examples: one module call each (the prompt messages and the reply to imitate), and their token ids.

Examples come from two sources: calls rebuilt from training annotations (:mod:`.annotated_calls`) and the
calls the program itself made on runs that earned a high reward (:func:`collect_sft_examples`, APEX-
Searcher's trajectory filter). Either way the prompt is the adapter's format of the call, prefilled reply
header included, and :func:`tokenize_example` turns it into the ids the local engine sends for it
(the chat template with the reply continued), followed by the reply's own ids and the end of the turn:
the model is trained on exactly the context it will read, and learns to stop after the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dspy

from apexdsp.errors import ApexError
from apexdsp.optimizers.module_prompts import (as_questions, current_adapter, format_messages, reply_prefix,
                                               reply_text)


@dataclass
class SFTExample:
    """One module call: the prompt messages and the completion to imitate (the whole reply, headers in)."""

    module: str
    messages: list[dict[str, str]]
    completion: str
    question_id: str = ""
    reward: float = 0.0
    source: str = "traces"  # "traces" (the program's own run) or "annotated"


def module_predictors(program: dspy.Module, modules: tuple[str, ...]) -> dict[str, dspy.Predict]:
    """Predictors named by ``modules`` (exact names, or every predictor under a sub-module name)."""
    chosen = {name: p for name, p in program.named_predictors()
              if any(name == m or name.startswith(f"{m}.") for m in modules)}
    if not chosen:
        known = ", ".join(name for name, _ in program.named_predictors())
        raise ApexError(f"no predictor matches {list(modules)}; the program's predictors are: {known}")
    return chosen


def collect_sft_examples(program: dspy.Module, trainset: list[Any], *, modules: tuple[str, ...] = ("executor",),
                         reward: str = "answer_f1", min_reward: float = 1.0, adapter: Any = None,
                         progress: bool = True, metric: Any = None, teacher: dspy.Module | None = None,
                         ) -> list[SFTExample]:
    """Run ``program`` (or ``teacher``, a program with the same predictors) on ``trainset`` and keep the chosen
    modules' calls from runs scoring >= ``min_reward`` by ``reward``, or by ``metric`` (DSPy's
    ``metric(example, prediction, trace)``; ``True`` counts 1). Calls are formatted for ``program``'s own
    predictors (its demos, its LM's prefilled header)."""
    from tqdm.auto import tqdm

    from apexdsp.data.examples import to_examples
    from apexdsp.optimizers.demos import metric_value
    from apexdsp.rewards import get_reward

    reward_fn = get_reward(reward) if metric is None else None
    adapter = adapter or current_adapter()
    chosen = module_predictors(program, modules)
    runner = teacher or program
    by_identity = {id(p): name for name, p in runner.named_predictors() if name in chosen}
    examples: list[SFTExample] = []
    for item, question in tqdm(list(zip(trainset, as_questions(trainset))), desc="collect SFT trajectories",
                               disable=not progress):
        with dspy.context(trace=[]):
            prediction = runner(question=question.question)
            trace = list(dspy.settings.trace)
        if reward_fn is None:
            example = item if isinstance(item, dspy.Example) else to_examples([question])[0]
            value = metric_value(metric(example, prediction, trace))
        else:
            output = getattr(prediction, "trajectory", None) or getattr(prediction, "answer", None)
            value = reward_fn(question, output).value
        if value < min_reward:
            continue
        for predictor, inputs, outputs in trace:
            name = by_identity.get(id(predictor))
            if name is None:
                continue
            completion = reply_text(chosen[name], dict(outputs), adapter)
            examples.append(SFTExample(name, format_messages(chosen[name], inputs, adapter), completion,
                                       question.id, value))
    return examples


def tokenize_example(example: SFTExample, tokenizer: Any, max_length: int | None = None) -> dict[str, list[int]]:
    """``input_ids`` and ``completion_mask`` (1 on the reply) of one example, as TRL's SFT takes them.

    The prompt ids are the engine's (:meth:`apexdsp.lm.engine.LocalEngine.prompt_ids`: the chat template,
    a prefilled reply continued); the reply after that prefill is tokenized on its own, as the model writes
    it, and ends with the tokenizer's EOS (the end of the turn, see ``align_end_of_turn``). A prompt that
    leaves no room for the reply under ``max_length`` is refused rather than trained on a cut reply.
    """
    from apexdsp.lm.engine import template_mode

    messages = example.messages
    prefix = reply_prefix(messages)
    reply = example.completion
    if prefix:
        if not reply.startswith(prefix):
            raise ApexError(f"SFT example for {example.module!r}: the reply does not start with the prefilled "
                            f"{prefix!r}")
        reply = reply[len(prefix):]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, **template_mode(messages))
    prompt = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    completion = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if max_length and len(prompt) + len(completion) > max_length:
        raise ApexError(f"SFT example for {example.module!r} (question {example.question_id}) has "
                        f"{len(prompt) + len(completion)} tokens, over max_length {max_length}")
    return {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}


__all__ = ["SFTExample", "collect_sft_examples", "module_predictors", "tokenize_example"]
