"""Executor SFT: successful trajectories -> (prompt, completion) pairs -> trl.SFTTrainer -> the module's LM.

Runs on the tiny random-init Llama of ``test_grpo`` (SmolLM2's tokenizer and chat template); the
trained model must put more probability on the imitated completions than the model it started from.
"""

from __future__ import annotations

import dspy
import mlflow
import pytest
import torch

from apexdsp.errors import ApexError
from apexdsp.lm.adapter import TolerantChatAdapter
from apexdsp.lm.registry import get_lm
from apexdsp.optimizers.module_prompts import format_messages
from apexdsp.optimizers.sft import ModuleSFT, SFTExample, SFTStageConfig, collect_sft_examples
from apexdsp.programs.base import QAProgram
from apexdsp.programs.planner import Planner
from tests.test_grpo import questions  # noqa: F401 - the shared fixture


class PlanAndAnswer(QAProgram):
    """A QAProgram (answer + trajectory) whose one module is the planner; the answer is its first step."""

    name = "plan-and-answer"

    def __init__(self):
        super().__init__()
        self.planner = Planner(max_tokens=8)

    def run(self, question, trajectory):
        planned = self.planner(question=question)
        trajectory.plans.append(planned.record)
        return planned.plan.steps[0].question


@pytest.fixture
def tiny_lm(tiny_model_dir):
    lm = get_lm(str(tiny_model_dir), max_tokens=8)
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        yield lm


def completion_nll(model_dir, messages, completion) -> float:
    """Mean negative log-likelihood of ``completion``'s tokens after the chat-formatted prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(target_ids)).item()


def test_collects_only_successful_runs_in_demo_format(tiny_lm, questions):  # noqa: F811
    program = PlanAndAnswer()
    kept = collect_sft_examples(program, questions[:2], modules=("planner",), reward="answer_f1", min_reward=0.0,
                                progress=False)
    assert [e.question_id for e in kept] == [q.id for q in questions[:2]]
    assert kept[0].module == "planner.write_plan"
    assert kept[0].completion.startswith("[[ ## plan ## ]]") and "[[ ## completed ## ]]" in kept[0].completion
    assert collect_sft_examples(program, questions[:2], modules=("planner",), reward="answer_em", min_reward=1.0,
                                progress=False) == []
    with pytest.raises(ApexError, match="no run reached answer_em >= 1.0"):
        ModuleSFT("unused").compile(program, trainset=questions[:2], modules=("planner",), reward="answer_em")
    with pytest.raises(ApexError, match="no predictor matches"):
        collect_sft_examples(program, questions[:1], modules=("executor",), progress=False)


def test_sft_trains_the_module_on_the_completions(tiny_lm, tiny_model_dir, questions, tmp_path):  # noqa: F811
    program = PlanAndAnswer()
    predictor = program.planner.write_plan
    adapter = TolerantChatAdapter()
    examples = []
    for question in questions[:2]:
        messages = format_messages(predictor, {"question": question.question}, adapter)
        plan = "1. Which entity does the question ask about?\n2. What is the answer about #1?"
        examples.append(SFTExample("planner.write_plan", messages,
                                   adapter.format_assistant_message_content(predictor.signature, {"plan": plan})))
    config = SFTStageConfig(max_steps=6, batch_size=2, learning_rate=5e-3, save_steps=3)
    optimizer = ModuleSFT(tmp_path / "out", config)
    trained = optimizer.compile(program, examples=examples, modules=("planner",))

    weights = tmp_path / "out" / "weights" / "planner"
    assert trained.planner.write_plan.lm.engine.model_dir == weights.resolve()
    assert program.planner.write_plan.lm is None
    before = completion_nll(tiny_model_dir, examples[0].messages, examples[0].completion)
    after = completion_nll(weights, examples[0].messages, examples[0].completion)
    assert after < before - 0.5, (before, after)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert "metrics.loss" in runs.columns and runs["metrics.loss"].notna().any()
