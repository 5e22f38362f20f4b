"""Module GRPO: real TRL runs on a tiny random-init Llama that speaks SmolLM2's tokenizer and chat template.

The tiny model (2 layers, 32 dims) keeps each run to seconds while everything around it is real: DSPy's
adapter formats the planner's prompts, TRL's GRPOTrainer samples and updates, the decomposition reward
scores the parsed plans, MLflow stores the metrics in the test's own sqlite store.
"""

from __future__ import annotations

import json
import math

import dspy
import mlflow
import pytest
import torch
from safetensors.torch import load_file

from apexdsp.data.loaders import read_questions
from apexdsp.errors import ApexError
from apexdsp.lm.registry import get_lm
from apexdsp.lm.adapter import TolerantChatAdapter
from apexdsp.optimizers.grpo import ModuleGRPO, align_end_of_turn
from apexdsp.optimizers.grpo_config import ModuleGRPOConfig, completion_length_for
from apexdsp.optimizers.module_prompts import (ModulePromptCollector, chat_prompt_text, find_predictor,
                                               format_messages)
from apexdsp.optimizers.module_rewards import (AnswerModuleReward, DecompositionModuleReward, RewardError,
                                               TRLRewardFunction, build_module_reward)
from apexdsp.optimizers.schedule import parse_stages
from apexdsp.optimizers.trained_lm import ModelNotTrainable, trained_weights
from apexdsp.programs.planner import Planner


@pytest.fixture(scope="module")
def questions(data_dir):
    return read_questions(data_dir / "hotpotqa" / "train.jsonl")[:4]


class PlanOnly(dspy.Module):
    """The smallest program with a real module: APEX's planner."""

    def __init__(self):
        super().__init__()
        self.planner = Planner(max_tokens=16)

    def forward(self, question: str):
        return self.planner(question=question)


@pytest.fixture
def tiny_lm(tiny_model_dir):
    lm = get_lm(str(tiny_model_dir), max_tokens=8)
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        yield lm


def tiny_config(**overrides) -> ModuleGRPOConfig:
    settings = dict(prompts_per_step=2, num_generations=2, max_completion_length=12, max_steps=2, save_steps=1,
                    learning_rate=1e-3, num_threads=2)
    settings.update(overrides)
    return ModuleGRPOConfig(**settings)


def test_prompts_are_what_dspy_sends(tiny_lm, questions):
    """The training prompt is the adapter's format of the call, and its tokens are the engine's tokens."""
    program = PlanOnly()
    program(question=questions[0].question)
    sent = tiny_lm.history[-1]["messages"]
    name, predictor = find_predictor(program, "planner")
    assert name == "planner.write_plan"
    assert format_messages(predictor, {"question": questions[0].question}) == sent
    assert sent[-1] == {"role": "assistant", "content": "[[ ## plan ## ]]"}  # the prefilled reply
    engine = tiny_lm.engine
    tokenizer = engine.tokenizer
    text = chat_prompt_text(sent, tokenizer)
    assert text.endswith("<|im_start|>assistant\n[[ ## plan ## ]]")  # continued, not a new turn
    from dspy.lm15 import Message, Request

    request = Request(model="x", system=sent[0]["content"],
                      messages=(Message.user(sent[1]["content"]), Message.assistant(sent[2]["content"])))
    ids, shared = engine.prompt_ids(request)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert 0 < shared < len(ids) - 10  # the system turn is shared; the question and the prefill are not


def test_trl_tokenizes_the_prompt_the_engine_sends(tiny_lm, questions, tmp_path, monkeypatch, engine_prompts):
    """TRL's own prompt tokenization (``GRPOTrainer._tokenize_prompts``, which both rollout paths use) gives
    the very ids the local engine was sent when the module ran, prefilled reply included."""
    sent = engine_prompts
    monkeypatch.setattr(tiny_lm, "cache", False)  # the call must reach the engine
    program = PlanOnly()
    program(question=questions[0].question)
    assert len(sent) == 1
    prompts = ModulePromptCollector("planner", progress=False).collect(program, questions[:1])
    signature = program.planner.write_plan.signature
    reward = TRLRewardFunction(DecompositionModuleReward(), prompts, signature, TolerantChatAdapter())
    optimizer = ModuleGRPO(tmp_path / "out", tiny_config(), module="planner", reward="decomposition")
    trainer, _ = optimizer._trainer(tiny_config(), tiny_lm.engine.model_dir, prompts, reward, tmp_path / "work",
                                    "planner.write_plan")
    trl_ids, _, _ = trainer._tokenize_prompts([trainer.train_dataset[0]["prompt"]])
    assert list(trl_ids[0]) == sent[0]
    tokenizer = trainer.processing_class
    assert tokenizer.decode(sent[0]).endswith("<|im_start|>assistant\n[[ ## plan ## ]]")
    # The chat messages themselves would have been rendered with a new turn after the prefilled header.
    conversational, _, _ = trainer._tokenize_prompts([prompts[0].messages])
    assert list(conversational[0]) != sent[0]


def test_collector_runs_the_program_for_downstream_modules(tiny_lm, questions):
    program = PlanOnly()
    prompts = ModulePromptCollector("planner.write_plan", direct=False, progress=False).collect(program, questions[:2])
    assert [p.question.id for p in prompts] == [q.id for q in questions[:2]]
    assert prompts[0].messages[-2]["content"].startswith("[[ ## question ## ]]")
    assert prompts[0].messages[-1] == {"role": "assistant", "content": "[[ ## plan ## ]]"}
    with pytest.raises(ApexError, match="no module 'missing'"):
        find_predictor(program, "missing")


class PlanOnlyFailingOnce(PlanOnly):
    def forward(self, question: str):
        if question.startswith("Which"):
            raise RuntimeError("this question breaks the program")
        return super().forward(question)


def test_collector_keeps_the_other_questions_when_the_program_raises_on_one(tiny_lm, questions, caplog):
    picked = [q.model_copy(update={"question": "Which one fails?"}) if i == 1 else q
              for i, q in enumerate(questions[:3])]
    prompts = ModulePromptCollector("planner.write_plan", direct=False, progress=False, threads=3).collect(
        PlanOnlyFailingOnce(), picked)
    assert [p.question.id for p in prompts] == [picked[0].id, picked[2].id]  # order kept, the failure skipped
    assert "raised on 1 of 3 questions" in caplog.text


def test_reward_function_scores_the_reply_after_a_prefilled_header(tiny_lm, questions):
    """TRL hands over what the model wrote after the prefilled header; the reward sees the whole reply
    (and a model that writes the header again is not penalised for it)."""
    program = PlanOnly()
    prompts = ModulePromptCollector("planner", progress=False).collect(program, questions[:1])
    assert prompts[0].messages[-1]["content"] == "[[ ## plan ## ]]"
    signature = program.planner.write_plan.signature
    reward = TRLRewardFunction(DecompositionModuleReward(), prompts, signature, TolerantChatAdapter())
    plan = "\n1. Who is the MP for Newark?\n2. When was #1 elected?\n\n[[ ## completed ## ]]"
    continued, repeated, empty = reward(prompts=[None] * 3, completions=[plan, "[[ ## plan ## ]]" + plan, ""],
                                        example_index=[0, 0, 0])
    assert continued > 0.3 and repeated == continued and empty == 0.0


def test_reward_function_parses_logs_and_rejects_nan(tiny_lm, questions):
    program = PlanOnly()
    unprefilled = TolerantChatAdapter(prefill=False)
    prompts = ModulePromptCollector("planner", adapter=unprefilled, progress=False).collect(program, questions[:1])
    signature = program.planner.write_plan.signature
    logged: dict[str, list[float]] = {}
    reward = TRLRewardFunction(DecompositionModuleReward(), prompts, signature, TolerantChatAdapter())
    good = "[[ ## plan ## ]]\n1. Who is the MP for Newark?\n2. When was #1 elected?\n\n[[ ## completed ## ]]"
    values = reward(prompts=[None, None], completions=[good, "no plan here"], example_index=[0, 0],
                    log_metric=lambda k, v: logged.setdefault(k, []).append(v))
    assert values[0] > 0.3 and values[1] == 0.0  # an unparseable plan scores 0 through its format component
    assert logged["parse_failure_rate"] == [0.5]
    assert logged["components/format/mean"] == [0.5]

    strict = DecompositionModuleReward(on_parse_failure=-1.0)
    values = TRLRewardFunction(strict, prompts, signature, TolerantChatAdapter())(
        prompts=[None], completions=["1. Who? 2. When was #1 born?"], example_index=[0])
    assert values == [-1.0]

    nan = TRLRewardFunction(build_module_reward(lambda q, out, text: math.nan), prompts, signature,
                            TolerantChatAdapter())
    with pytest.raises(RewardError, match="nan"):
        nan(prompts=[None], completions=[good], example_index=[0])
    broken = TRLRewardFunction(build_module_reward(lambda q, out, text: 1 / 0), prompts, signature,
                               TolerantChatAdapter())
    with pytest.raises(RewardError, match="ZeroDivisionError"):
        broken(prompts=[None], completions=[good], example_index=[0])


def test_answer_reward_uses_the_matching_gold_step():
    from apexdsp.data.records import DecompositionStep, Question
    from apexdsp.optimizers.module_prompts import ModulePrompt

    question = Question(id="m", question="When was the director of Jaws born?", answer="1946",
                        decomposition=[DecompositionStep(question="Who directed Jaws?", answer="Steven Spielberg"),
                                       DecompositionStep(question="When was #1 born?", answer="1946")])
    call = ModulePrompt("executor.analyze", question, {"question": "Who directed Jaws?", "passages": ""}, [])
    scores = AnswerModuleReward(kind="em").score([call, call], [{"answer": "Steven Spielberg"}, {"answer": "1946"}],
                                                  ["", ""])
    assert [s.value for s in scores] == [1.0, 0.0]


def test_grpo_trains_the_module_and_logs_to_mlflow(tiny_lm, tiny_model_dir, questions, tmp_path):
    student = PlanOnly()
    optimizer = ModuleGRPO(tmp_path / "out", tiny_config(), module="planner", reward="decomposition")
    trained = optimizer.compile(student, trainset=questions)
    result = optimizer.result

    weights = tmp_path / "out" / "weights" / "planner.write_plan"
    assert result.weights == weights and (weights / "model.safetensors").is_file()
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(weights / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "GRPO left every weight as it was"
    # The module calls a new LM over the trained folder; the student keeps the configured LM.
    assert trained.planner.write_plan.lm.engine.model_dir == weights.resolve()
    assert student.planner.write_plan.lm is None
    assert trained_weights(trained) == {"planner.write_plan": weights.resolve()}
    assert trained(question=questions[0].question).plan.steps  # the trained module still runs

    client = mlflow.tracking.MlflowClient()
    run = client.get_run(result.run_id)
    for key in ("reward", "reward_std", "kl", "completions/mean_length", "parse_failure_rate",
                "components/format/mean", "frac_reward_zero_std", "time/generation_s", "time/reward_s",
                "time/loss_backward_s", "zero_std/mean_fraction"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(result.run_id, "reward")] == [1, 2]
    artifacts = [a.path for a in client.list_artifacts(result.run_id)]
    assert "reward_curve.png" in artifacts
    assert run.data.params["module"] == "planner.write_plan"


def test_bf16_mixed_precision_trains_float32_weights(tiny_lm, questions, tmp_path):
    config = tiny_config(mixed_precision="bf16")
    assert config.to_trl(tmp_path / "trl").bf16  # TRL's autocast switch, with the model left in float32
    optimizer = ModuleGRPO(tmp_path / "out", config, module="planner", reward="decomposition")
    optimizer.compile(PlanOnly(), trainset=questions)

    weights = load_file(optimizer.result.weights / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert optimizer.result.steps == 2
    with pytest.raises(ApexError, match="mixed_precision"):
        ModuleGRPOConfig(mixed_precision="fp16")


def test_interrupted_run_resumes_from_its_checkpoint(tiny_lm, questions, tmp_path):
    calls = {"n": 0}

    def interrupting(question, outputs, completion):
        calls["n"] += 1
        if calls["n"] > 4:  # step 2 (2 prompts x 2 completions per step)
            raise KeyboardInterrupt
        return float(len(completion) % 3)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        ModuleGRPO(out, tiny_config(), module="planner", reward=interrupting).compile(PlanOnly(), trainset=questions)
    assert (out / "grpo" / "planner.write_plan" / "checkpoints" / "checkpoint-1").is_dir()
    assert not (out / "weights" / "planner.write_plan").exists()  # nothing half-written

    steps = []

    def counting(question, outputs, completion):
        steps.append(1)
        return float(len(completion) % 3)

    optimizer = ModuleGRPO(out, tiny_config(), module="planner", reward=counting)
    optimizer.compile(PlanOnly(), trainset=questions)
    assert optimizer.result.steps == 2
    assert len(steps) == 4  # only step 2 was run again: step 1 came from the checkpoint
    saved = json.loads((out / "grpo" / "planner.write_plan" / "result.json").read_text())
    assert [row["step"] for row in saved["history"] if "reward" in row] == [1, 2]


def test_constant_reward_is_reported_as_no_signal(tiny_lm, questions, tmp_path):
    optimizer = ModuleGRPO(tmp_path / "out", tiny_config(max_steps=1), module="planner", reward=lambda q, out, text: 1.0)
    optimizer.compile(PlanOnly(), trainset=questions)
    result = optimizer.result
    assert result.zero_std["zero_std/mean_fraction"] == 1.0
    assert result.warnings and "no learning signal" in result.warnings[0]
    tags = mlflow.tracking.MlflowClient().get_run(result.run_id).data.tags
    assert "no learning signal" in tags["apexdsp.zero_signal_warning"]


def test_nan_reward_stops_training_with_a_clear_error(tiny_lm, questions, tmp_path):
    with pytest.raises(RewardError, match="returned nan on module 'planner.write_plan'"):
        ModuleGRPO(tmp_path / "out", tiny_config(), module="planner",
                   reward=lambda q, out, text: float("nan")).compile(PlanOnly(), trainset=questions)
    assert not (tmp_path / "out" / "weights").exists()


def test_remote_lm_cannot_be_trained(questions, tmp_path):
    program = PlanOnly()
    program.planner.write_plan.lm = dspy.LM("openai/gpt-4o-mini")
    with pytest.raises(ModelNotTrainable, match="served remotely"):
        ModuleGRPO(tmp_path / "out", module="planner", reward="decomposition").compile(program, trainset=questions)
    assert not (tmp_path / "out").exists()


def test_config_and_schedule_validation(tmp_path):
    with pytest.raises(ApexError, match="num_generations"):
        ModuleGRPOConfig(num_generations=1)
    with pytest.raises(ApexError, match="vllm_server_base_url"):
        ModuleGRPOConfig(use_vllm=True, vllm_mode="server")
    trl_config = ModuleGRPOConfig(prompts_per_step=3, num_generations=4, use_lora=True).to_trl(tmp_path)
    # one prompt's group per micro-batch, the step's 12 sequences accumulated
    assert (trl_config.per_device_train_batch_size, trl_config.gradient_accumulation_steps,
            trl_config.num_generations, trl_config.generation_batch_size) == (4, 3, 4, 12)
    with pytest.raises(ApexError, match="micro_batch_size 5 must divide"):
        ModuleGRPOConfig(prompts_per_step=3, num_generations=4, micro_batch_size=5)
    assert trl_config.use_cpu and trl_config.report_to == []
    assert ModuleGRPOConfig(use_lora=True).lora().r == 16
    stages = parse_stages("bootstrap+grpo(planner.write_plan)+grpo(executor.analyze:answer)+sft(executor)")
    assert [(s.kind, s.module, s.resolved_reward() if s.kind == "grpo" else None) for s in stages] == [
        ("grpo", "planner.write_plan", "decomposition"), ("grpo", "executor.analyze", "answer"),
        ("sft", "executor", None)]
    with pytest.raises(ApexError, match="bad stage"):
        parse_stages("grpo(planner")


def test_completion_length_defaults_to_what_the_module_may_write_at_inference():
    """A planner allowed 96 tokens at inference is sampled up to 96 in training, not cut at a fixed 64."""
    planner = dspy.Predict("question -> plan", max_tokens=96)
    assert completion_length_for(ModuleGRPOConfig(), planner).max_completion_length == 96
    assert completion_length_for(ModuleGRPOConfig(max_completion_length=12), planner).max_completion_length == 12
    assert completion_length_for(ModuleGRPOConfig(), dspy.Predict("question -> plan")).max_completion_length == 64
    with pytest.raises(ApexError, match="max_completion_length"):
        ModuleGRPOConfig(max_completion_length=0)


def test_end_of_turn_token_is_the_models():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apexdsp.lm.gguf_models import ensure_converted

    folder = ensure_converted("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = type("M", (), {"generation_config": AutoModelForCausalLM.from_pretrained(folder).generation_config})
    align_end_of_turn(tokenizer, model)
    assert tokenizer.eos_token == "<|im_end|>"


def test_weight_stages_alone_compile_the_uncompiled_program_from_the_command_line(tiny_model_dir, data_dir,
                                                                                   tmp_path):
    """``apexdsp compile --optimizer 'grpo(...)'`` without bootstrap trains the uncompiled program's module and
    saves a compiled directory that ``evaluate --compiled`` runs."""
    import subprocess
    import sys
    from pathlib import Path

    import os

    apexdsp = str(Path(sys.executable).parent / "apexdsp")
    out = tmp_path / "vanilla-grpo"
    closed = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # --no-track must never reach it
    common = ["--program", "vanilla", "--lm", str(tiny_model_dir), "--trainset",
              str(data_dir / "hotpotqa" / "train.jsonl"), "--limit-train", "4", "--grpo-steps", "1", "--grpo-beta", "0"]
    for optimizer, target, expected in [("bootstrap+grpo(nosuch:answer)", out, "stage grpo(nosuch): program has no module"),
                                         ("grpo(generate_answer:answer)", tmp_path / "a-file" / "x", "cannot be written")]:
        (tmp_path / "a-file").write_text("")
        refused = subprocess.run([apexdsp, "compile", *common, "--optimizer", optimizer, "--out", str(target),
                                  "--no-track"], capture_output=True, text=True, timeout=600, env=closed)
        assert refused.returncode == 2 and expected in refused.stderr, refused.stderr[-2000:]
        assert len(refused.stderr.strip().splitlines()) == 1 and refused.stderr.startswith("error: ")
    result = subprocess.run([apexdsp, "compile", *common, "--optimizer", "grpo(generate_answer:answer)",
                             "--out", str(out), "--no-track", "--json"], capture_output=True, text=True, timeout=600,
                            env=closed)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["start_from"] == "uncompiled" and summary["stages"][0]["steps"] == 1
    assert (out / "weights" / "generate_answer" / "model.safetensors").is_file()
    manifest = json.loads((out / "apexdsp-compiled.json").read_text())
    assert manifest["program"] == "vanilla" and manifest["optimizer"]["start_from"] == "uncompiled"
    evaluated = subprocess.run([apexdsp, "evaluate", "--compiled", str(out), "--lm", str(tiny_model_dir),
                                "--questions", str(data_dir / "hotpotqa" / "dev.jsonl"), "--limit", "1",
                                "--no-track", "--json"], capture_output=True, text=True, timeout=600, env=closed)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["n"] == 1


def test_the_batching_decoder_samples_what_model_generate_would(tiny_model_dir):
    """Greedy rows from the engine's decoder equal ``model.generate``'s, prompt by prompt, with identical
    prompts sharing one prefill (the GRPO group case)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apexdsp.lm.generation import SamplingParams
    from apexdsp.optimizers.engine_rollout import generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    texts = ["Plan the steps: which river flows through the capital of France?", "Who wrote Hamlet, and when?"]
    prompts = [tokenizer(text)["input_ids"] for text in texts for _ in range(2)]  # two copies each, as TRL repeats
    rows = generate(model, tokenizer, prompts, SamplingParams(max_tokens=10, temperature=0.0),
                    tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    assert [row.prompt_ids for row in rows] == prompts
    for row, ids in zip(rows, prompts):
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert row.generated == expected[0, len(ids):].tolist()


def test_grpo_with_the_engines_rollouts_trains_the_module(tiny_lm, tiny_model_dir, questions, tmp_path, monkeypatch):
    from apexdsp.optimizers.engine_rollout import EngineRollout

    seen = []
    real = EngineRollout.__call__

    def recording(self, prompts, trainer):
        output = real(self, prompts, trainer)
        seen.append((prompts, output))
        return output

    monkeypatch.setattr(EngineRollout, "__call__", recording)
    config = tiny_config(rollout_engine="apexdsp", mixed_precision="bf16")
    optimizer = ModuleGRPO(tmp_path / "out", config, module="planner", reward="decomposition")
    optimizer.compile(PlanOnly(), trainset=questions)

    assert optimizer.result.steps == 2 and len(seen) == 2  # one rollout per step
    for prompts, output in seen:
        completions = output["completion_ids"]
        assert len(completions) == len(output["prompt_ids"]) == len(prompts) == 4  # 2 prompts x 2 generations
        assert output["prompt_ids"][0] == output["prompt_ids"][1]  # a prompt's group arrives together
        assert all(1 <= len(ids) <= 12 for ids in completions)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(optimizer.result.weights / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "GRPO left every weight as it was"
    assert mlflow.tracking.MlflowClient().get_run(optimizer.result.run_id).data.metrics["time/generation_s"] > 0
    with pytest.raises(ApexError, match="choose one"):
        ModuleGRPOConfig(rollout_engine="apexdsp", use_vllm=True)
    with pytest.raises(ApexError, match="min_p"):
        from apexdsp.optimizers.engine_rollout import sampling_params

        sampling_params(tiny_config(trl_overrides={"min_p": 0.1}).to_trl(tmp_path / "trl"))
