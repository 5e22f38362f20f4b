"""Module SFT: annotated calls or successful trajectories -> (prompt, completion) ids -> trl.SFTTrainer.

Runs on the tiny random-init Llama of ``test_grpo`` (SmolLM2's tokenizer and chat template); the
trained model must put more probability on the imitated completions than the model it started from.
Annotated calls are rebuilt over a real BM25 index of real HotpotQA and MuSiQue paragraphs.
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
from apexdsp.optimizers.sft_examples import tokenize_example
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


def completion_nll(model_dir, example) -> float:
    """Mean negative log-likelihood of an example's reply tokens in the context the engine sends."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    row = tokenize_example(example, tokenizer)
    ids = torch.tensor([row["input_ids"]])
    mask = torch.tensor(row["completion_mask"][1:], dtype=torch.bool)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits[mask], ids[0, 1:][mask]).item()


def test_collects_only_successful_runs_in_demo_format(tiny_lm, questions):  # noqa: F811
    program = PlanAndAnswer()
    kept = collect_sft_examples(program, questions[:2], modules=("planner",), reward="answer_f1", min_reward=0.0,
                                progress=False)
    assert [e.question_id for e in kept] == [q.id for q in questions[:2]]
    assert kept[0].module == "planner.write_plan"
    assert kept[0].completion.startswith("[[ ## plan ## ]]") and "[[ ## completed ## ]]" in kept[0].completion
    assert collect_sft_examples(program, questions[:2], modules=("planner",), reward="answer_em", min_reward=1.0,
                                progress=False) == []
    with pytest.raises(ApexError, match=r"no usable example \(no run of 2 reached answer_em >= 1.0\)"):
        ModuleSFT("unused", SFTStageConfig(source="traces"), modules=("planner",), reward="answer_em").compile(
            program, trainset=questions[:2])
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
    config = SFTStageConfig(max_steps=6, batch_size=2, learning_rate=5e-3, save_steps=3, train_layers=None)
    optimizer = ModuleSFT(tmp_path / "out", config, modules=("planner",))
    trained = optimizer.compile(program, examples=examples)

    weights = tmp_path / "out" / "weights" / "planner"
    assert trained.planner.write_plan.lm.engine.model_dir == weights.resolve()
    assert program.planner.write_plan.lm is None
    before = completion_nll(tiny_model_dir, examples[0])
    after = completion_nll(weights, examples[0])
    assert after < before - 0.5, (before, after)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert "metrics.loss" in runs.columns and runs["metrics.loss"].notna().any()


def test_sft_ids_are_the_engines_prompt_then_the_reply(tiny_lm, tiny_model_dir, questions, tmp_path,  # noqa: F811
                                                       monkeypatch, engine_prompts):
    """The trained sequence starts with the very ids the engine was sent for the call (prefilled header
    continued, not a new turn), TRL keeps them as given, and the loss covers only the reply and its end."""
    sent = engine_prompts
    monkeypatch.setattr(tiny_lm, "cache", False)  # the call must reach the engine
    program = PlanAndAnswer()
    program(question=questions[1].question)
    adapter = TolerantChatAdapter()
    predictor = program.planner.write_plan
    example = SFTExample("planner.write_plan", format_messages(predictor, {"question": questions[1].question}, adapter),
                         adapter.format_assistant_message_content(predictor.signature, {"plan": "1. Who?"}))
    optimizer = ModuleSFT(tmp_path / "out", SFTStageConfig(max_steps=1, train_layers=1), modules=("planner",))
    trainer = optimizer._trainer(tiny_model_dir, [example], tmp_path / "work")
    row = trainer.train_dataset[0]
    prompt_length = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert row["input_ids"][:prompt_length] == sent[0]
    assert row["labels"][prompt_length:] == row["input_ids"][prompt_length:]
    reply = trainer.processing_class.decode(row["input_ids"][prompt_length:])
    # the rest of the reply, then the end of the turn
    assert reply == example.completion.removeprefix("[[ ## plan ## ]]") + "<|im_end|>"
    assert reply.startswith("\n1. Who?\n\n[[ ## completed ## ]]")


def test_train_layers_leaves_the_lower_layers_as_they_were(tiny_lm, tiny_model_dir, questions, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    program = PlanAndAnswer()
    adapter = TolerantChatAdapter()
    predictor = program.planner.write_plan
    examples = [SFTExample("planner.write_plan", format_messages(predictor, {"question": q.question}, adapter),
                           adapter.format_assistant_message_content(predictor.signature, {"plan": "1. Who is it?"}))
                for q in questions[:2]]
    config = SFTStageConfig(max_steps=2, batch_size=2, learning_rate=1e-2, train_layers=1,
                            mixed_precision="bf16")
    optimizer = ModuleSFT(tmp_path / "out", config, modules=("planner",))
    optimizer.compile(program, examples=examples)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(tmp_path / "out" / "weights" / "planner" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm")) for k in changed), sorted(changed)
    assert not (tmp_path / "out" / "sft" / "planner" / "checkpoints").exists()  # removed once the weights exist
    assert optimizer.report["trainable_parameters"] > 0 and optimizer.report["seconds_per_100_examples"] > 0


def test_annotated_reader_calls_are_supported_by_what_they_show(tiny_lm, paragraphs_index):
    from apexdsp.optimizers.annotated_calls import AnnotatedReport, annotated_examples
    from apexdsp.programs.question_forms import choice_options, is_yes_no_question
    from apexdsp.programs.registry import build_program

    records, retriever = paragraphs_index
    hotpot = records[:30]
    program = build_program("rag", retriever=retriever)
    report = AnnotatedReport()
    predictors = {"reader.generate": program.reader.generate}
    examples = annotated_examples(program, hotpot, predictors, retriever=retriever, report=report)
    by_id = {q.id: q for q in hotpot}
    assert 5 <= len(examples) < len(hotpot)
    for example in examples:
        question = by_id[example.question_id]
        assert not is_yes_no_question(question.question) and choice_options(question.question) is None
        prompt = example.messages[-2]["content"]
        assert question.question in prompt and question.answer in prompt  # the answer is shown
        assert example.messages[-1] == {"role": "assistant", "content": "[[ ## answer ## ]]"}
        assert example.completion.strip() == f"[[ ## answer ## ]]\n{question.answer}\n\n[[ ## completed ## ]]"
    dropped = report.summary()["dropped"]
    assert dropped.get("reader.generate/closed form (typed predictors)", 0) > 0
    assert sum(report.kept.values()) + sum(dropped.values()) == len(hotpot)


def test_annotated_executor_and_answer_step_calls_follow_the_gold_decomposition(tiny_lm, paragraphs_index):
    from apexdsp.optimizers.annotated_calls import AnnotatedReport, annotated_examples, filled_steps
    from apexdsp.programs.registry import build_program

    records, retriever = paragraphs_index
    musique = [r for r in records if r.decomposition][:10]
    program = build_program("apex", retriever=retriever)
    report = AnnotatedReport()
    predictors = {"executor.analyze": program.executor.analyze, "answer_step.generate": program.answer_step.generate,
                  "planner.write_plan": program.planner.write_plan}
    examples = annotated_examples(program, musique, predictors, retriever=retriever, report=report)
    analyze = [e for e in examples if e.module == "executor.analyze"]
    final = [e for e in examples if e.module == "answer_step.generate"]
    plans = [e for e in examples if e.module == "planner.write_plan"]
    assert analyze and final and plans
    assert "1. " in plans[0].completion and "#1" in plans[0].completion  # the gold steps, placeholders kept
    first = musique[0]
    steps = filled_steps(first)
    assert "#" not in steps[-1][0] and steps[0][1] in steps[-1][0]  # "#1" became the first sub-answer
    for example in analyze:
        assert "[[ ## answered ## ]]\nyes" in example.completion
    for example in final:
        assert "[[ ## findings ## ]]" in example.messages[-2]["content"]


def test_answer_step_calls_without_a_decomposition_follow_a_one_step_plan(tiny_lm, paragraphs_index):
    """HotpotQA has no sub-questions: the answer step's calls are those after a one-step plan (the question
    itself). Open questions: the finding is the gold answer, kept only where the passages show it; closed
    forms go to the typed predictors, whose finding names the top passage, never the judgement."""
    from apexdsp.optimizers.annotated_calls import AnnotatedReport, annotated_examples
    from apexdsp.programs.question_forms import choice_options, is_yes_no_question
    from apexdsp.programs.registry import build_program

    records, retriever = paragraphs_index
    hotpot = [r for r in records if not r.decomposition]
    program = build_program("apex", retriever=retriever)
    predictors = {name: getattr(program.answer_step, name.split(".")[1])
                  for name in ("answer_step.generate", "answer_step.decide", "answer_step.choose")}
    report = AnnotatedReport()
    examples = annotated_examples(program, hotpot, predictors, retriever=retriever, report=report)
    by_id = {q.id: q for q in hotpot}
    assert {e.module for e in examples} == set(predictors)
    for example in examples:
        question = by_id[example.question_id]
        prompt = example.messages[-2]["content"]
        findings = prompt.split("[[ ## findings ## ]]")[1].split("[[ ## passages ## ]]")[0].strip()
        passages = prompt.split("[[ ## passages ## ]]")[1]
        assert findings.startswith(f"- {question.question} -> ")
        if example.module == "answer_step.generate":
            assert findings == f"- {question.question} -> {question.answer}"
            assert question.answer.lower() in passages.lower()  # the executor could have read it there
        else:
            assert is_yes_no_question(question.question) or choice_options(question.question) is not None
            top_title = passages.split("[1] ", 1)[1].split(":", 1)[0]
            assert findings == f"- {question.question} -> {top_title}"
    dropped = report.summary()["dropped"]
    assert dropped["answer_step.generate/answer not in the prompt"] > 0
    assert dropped["answer_step.generate/closed form (typed predictors)"] > 0


def test_a_stage_the_program_cannot_run_is_refused_before_any_work(tiny_lm, paragraphs_index, tmp_path):
    from apexdsp.optimizers.schedule import ProgressiveSchedule, parse_stages
    from apexdsp.programs.registry import build_program

    _, retriever = paragraphs_index
    program = build_program("rag", retriever=retriever)
    with pytest.raises(ApexError, match="stage sft\\(nosuch\\): no predictor matches"):
        ProgressiveSchedule(parse_stages("sft(nosuch)"), tmp_path, retriever=retriever).check(program)
    with pytest.raises(ApexError, match="stage grpo\\(nosuch\\): program has no module"):
        ProgressiveSchedule(parse_stages("grpo(nosuch:answer)"), tmp_path, retriever=retriever).check(program)
    apex = build_program("apex", retriever=retriever)
    with pytest.raises(ApexError, match="no calls to rebuild from annotations"):
        ProgressiveSchedule(parse_stages("sft(executor.rewrite)"), tmp_path, retriever=retriever).check(apex)
    with pytest.raises(ApexError, match="GRPO trains one module per stage"):
        parse_stages("grpo(reader.decide,reader.choose)")
    with pytest.raises(ApexError, match="needs the index"):
        ProgressiveSchedule(parse_stages("sft(reader.generate)"), tmp_path).check(program)
    ProgressiveSchedule(parse_stages("sft(reader.generate)"), tmp_path, retriever=retriever).check(program)
    ProgressiveSchedule(parse_stages("sft(reader.decide,reader.choose)"), tmp_path, retriever=retriever).check(program)


def test_typed_calls_train_the_one_token_the_engine_reads(tiny_lm, tiny_model_dir, paragraphs_index, tmp_path):
    """A yes/no or A/B call is decoded as one constrained token right after the prefilled header: the SFT
    examples put the gold choice there, and after training the program's own call (the real engine, the
    constraint applied) answers what it was trained to."""
    from apexdsp.lm.adapter import choice_constraint
    from apexdsp.optimizers.annotated_calls import AnnotatedReport, annotated_examples
    from apexdsp.optimizers.module_prompts import reply_text
    from apexdsp.programs.question_forms import choice_options, is_yes_no_question
    from apexdsp.programs.registry import build_program
    from transformers import AutoTokenizer

    records, retriever = paragraphs_index
    program = build_program("rag", retriever=retriever)
    predictors = {"reader.decide": program.reader.decide, "reader.choose": program.reader.choose}
    report = AnnotatedReport()
    examples = annotated_examples(program, records, predictors, retriever=retriever, report=report)
    by_id = {q.id: q for q in records}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert {e.module for e in examples} == set(predictors)
    for example in examples:
        question = by_id[example.question_id]
        predictor = predictors[example.module]
        target = example.completion.removeprefix("[[ ## answer ## ]]")
        if example.module == "reader.decide":
            assert is_yes_no_question(question.question) and target == question.answer.lower()
        else:
            options = choice_options(question.question)
            assert options[{"A": 0, "B": 1}[target]].lower() == question.answer.lower()
        allowed = {int(t) for t in choice_constraint(predictor.signature, tiny_lm)["logit_bias"]}
        first = tokenize_example(example, tokenizer)
        reply_ids = [i for i, m in zip(first["input_ids"], first["completion_mask"]) if m]
        assert reply_ids[0] in allowed and tokenizer.decode(reply_ids[:1]).strip().lower() == target.lower()
    assert sum(report.kept.values()) == len(examples) and report.dropped

    # train one yes/no call on the answer the untrained program does not give, and ask the program again
    example = next(e for e in examples if e.module == "reader.decide")
    inputs = {"question": by_id[example.question_id].question,
              "passages": example.messages[-2]["content"].split("[[ ## passages ## ]]")[1].split("[[ ##")[0].strip()}
    with dspy.context(lm=tiny_lm):
        before = program.reader.decide(**inputs).answer
    flipped = {"yes": "no", "no": "yes"}[before]
    trained_example = SFTExample("reader.decide", example.messages,
                                 reply_text(program.reader.decide, {"answer": flipped}))
    config = SFTStageConfig(max_steps=8, batch_size=1, learning_rate=5e-3, train_layers=None)
    trained = ModuleSFT(tmp_path / "out", config, modules=("reader.decide",)).compile(
        program, examples=[trained_example])
    assert trained.reader.decide(**inputs).answer == flipped
    assert trained.reader.generate.lm is program.reader.generate.lm  # the other predictors keep their LM
