"""Executor SFT (APEX-Searcher's executor training): supervised fine-tuning on successful trajectories.

APEX-Searcher trains its executor by imitation before any RL: the program is run on training questions,
only the runs whose final answer earned a high reward are kept, and every call the executor's predictors
made in them (query writing, analysis-answer, rewrite) becomes a (prompt, completion) pair: the prompt as
DSPy's adapter formatted it, the completion as the adapter formats those outputs when it writes a demo.
``trl.SFTTrainer`` then trains the module's LM on the completions only, and the module's predictors call
a new LM over the trained weights (``<out>/weights/<name>/``, safetensors), exactly as after GRPO.

The pairs can also come from elsewhere: :func:`collect_sft_examples` is what the bootstrapping stage
calls on the traces it keeps, and ``examples=`` takes them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter

from apexdsp.errors import ApexError
from apexdsp.memory import release_memory
from apexdsp.optimizers.grpo import COMPILE_EXPERIMENT, _has_active_run, align_end_of_turn
from apexdsp.optimizers.trainer_checkpoints import last_checkpoint
from apexdsp.optimizers.grpo_config import LoraOptions
from apexdsp.optimizers.grpo_tracking import MlflowStepLogger
from apexdsp.optimizers.module_prompts import as_questions, current_adapter, format_messages, reply_prefix
from apexdsp.optimizers.trained_lm import (copy_program, is_trained, module_lm, save_trained_weights,
                                           trainable_model_dir, use_trained_lm, weights_dir)
from apexdsp.tracking.run import tracked_run

logger = logging.getLogger(__name__)


@dataclass
class SFTStageConfig(LoraOptions):
    """Settings of one SFT stage; the TRL fields that matter, CPU-sane defaults (see ``grpo_config`` for GPU)."""

    learning_rate: float = 2e-5
    num_train_epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides the epochs
    batch_size: int = 4
    max_length: int = 1024
    seed: int = 0
    lora_dropout: float = 0.0  # peft's default; the other LoRA settings: see LoraOptions
    save_steps: int = 50
    save_total_limit: int = 2
    resume: bool = True
    use_cpu: bool | None = None
    dtype: str = "float32"
    num_threads: int | None = 2
    trl_overrides: dict[str, Any] = field(default_factory=dict)

    def to_trl(self, output_dir: str | Path) -> Any:
        import torch
        from trl import SFTConfig

        use_cpu = self.use_cpu if self.use_cpu is not None else not torch.cuda.is_available()
        settings = dict(output_dir=str(output_dir), learning_rate=self.learning_rate,
                        num_train_epochs=self.num_train_epochs, max_steps=self.max_steps,
                        per_device_train_batch_size=self.batch_size, max_length=self.max_length, seed=self.seed,
                        completion_only_loss=True, logging_steps=1, save_strategy="steps", save_steps=self.save_steps,
                        save_total_limit=self.save_total_limit, report_to="none", use_cpu=use_cpu,
                        bf16=self.dtype == "bfloat16", fp16=False, dataloader_num_workers=0)
        settings.update(self.trl_overrides)
        return SFTConfig(**settings)


@dataclass
class SFTExample:
    """One module call from a successful run: the prompt messages and the completion to imitate."""

    module: str
    messages: list[dict[str, str]]
    completion: str
    question_id: str = ""
    reward: float = 0.0


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
                         progress: bool = True) -> list[SFTExample]:
    """Run ``program`` on ``trainset`` and keep the chosen modules' calls from runs scoring >= ``min_reward``."""
    from tqdm.auto import tqdm

    from apexdsp.rewards import get_reward

    reward_fn = get_reward(reward)
    adapter = adapter or current_adapter()
    chosen = module_predictors(program, modules)
    by_identity = {id(p): name for name, p in chosen.items()}
    examples: list[SFTExample] = []
    for question in tqdm(as_questions(trainset), desc="collect SFT trajectories", disable=not progress):
        with dspy.context(trace=[]):
            prediction = program(question=question.question)
            trace = list(dspy.settings.trace)
        value = reward_fn(question, prediction.trajectory).value
        if value < min_reward:
            continue
        for predictor, inputs, outputs in trace:
            name = by_identity.get(id(predictor))
            if name is None:
                continue
            completion = adapter.format_assistant_message_content(predictor.signature, dict(outputs))
            examples.append(SFTExample(name, format_messages(predictor, inputs, adapter), completion,
                                       question.id, value))
    return examples


class ModuleSFT(Teleprompter):
    """SFT of the LM behind some modules (default: the executor's predictors) with ``trl.SFTTrainer``."""

    def __init__(self, out_dir: str | Path, config: SFTStageConfig | None = None, *,
                 experiment: str = COMPILE_EXPERIMENT):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.config = config or SFTStageConfig()
        self.experiment = experiment
        self.examples: list[SFTExample] = []

    def compile(self, student: dspy.Module, *, trainset: list[Any] | None = None,
                modules: tuple[str, ...] = ("executor",), examples: list[SFTExample] | None = None,
                reward: str = "answer_f1", min_reward: float = 1.0, name: str | None = None,
                teacher: Any = None, valset: Any = None) -> dspy.Module:
        """A copy of ``student`` whose chosen predictors call the fine-tuned LM."""
        config = self.config
        program = copy_program(student)
        predictors = module_predictors(program, tuple(modules))
        lms = {id(module_lm(p)): module_lm(p) for p in predictors.values()}
        if len(lms) != 1:
            raise ApexError(f"the predictors {list(predictors)} use {len(lms)} different LMs; SFT trains one")
        base_lm = next(iter(lms.values()))
        base_dir = trainable_model_dir(base_lm, ",".join(predictors))
        name = name or "+".join(modules)
        target, work = weights_dir(self.out_dir, name), self.out_dir / "sft" / name
        if config.resume and is_trained(target):
            use_trained_lm(list(predictors.values()), target, base_lm)
            return program
        if examples is None:
            if trainset is None:
                raise ApexError("SFT needs a trainset to collect trajectories from, or examples=")
            examples = collect_sft_examples(program, trainset, modules=tuple(modules), reward=reward,
                                            min_reward=min_reward)
        if not examples:
            raise ApexError(f"no run reached {reward} >= {min_reward}: no successful trajectory to fine-tune on")
        self.examples = examples
        params = {"modules": ",".join(modules), "examples": len(examples), "reward": reward,
                  "min_reward": min_reward, "base_model": str(base_dir),
                  **{f"sft.{k}": v for k, v in asdict(config).items()}}
        started = time.perf_counter()
        with tracked_run(self.experiment, run_name=f"sft-{name}", params=params, nested=_has_active_run(),
                         tags={"apexdsp.kind": "sft"}) as run:
            trainer = self._trainer(base_dir, examples, work)
            checkpoint = last_checkpoint(work / "checkpoints") if config.resume else None
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            run.log_metrics({"compile_seconds": time.perf_counter() - started})
            save_trained_weights(trainer.model, trainer.processing_class, target,
                                 {"modules": list(predictors), "kind": "sft", "examples": len(examples),
                                  "steps": trainer.state.global_step, "base_model": str(base_dir),
                                  "mlflow_run": run.run_id})
        del trainer
        release_memory()  # the trainer's model, optimizer state and cycles; see apexdsp.memory
        use_trained_lm(list(predictors.values()), target, base_lm)
        return program

    def _trainer(self, base_dir: Path, examples: list[SFTExample], work: Path):
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTTrainer

        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, self.config.dtype))
        align_end_of_turn(tokenizer, model)
        # The completion is the whole reply, so a prefilled header at the end of the prompt is dropped: the
        # model learns to write it, and at inference it continues it.
        rows = [{"prompt": e.messages[:-1] if reply_prefix(e.messages) else e.messages,
                 "completion": [{"role": "assistant", "content": e.completion}]} for e in examples]
        return SFTTrainer(model=model, args=self.config.to_trl(work / "checkpoints"),
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=self.config.lora(), callbacks=[MlflowStepLogger()])


__all__ = ["ModuleSFT", "SFTExample", "SFTStageConfig", "collect_sft_examples", "module_predictors"]
