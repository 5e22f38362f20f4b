"""Module GRPO: train the LM weights behind one module of a (compiled) program on that module's reward.

The second compiler stage, after OPERA's MAPGRPO and QAgent's staged training: the module's
prompts are collected from runs of the program on training questions and formatted exactly as DSPy's
adapter sends them (:mod:`.module_prompts`); ``trl.GRPOTrainer`` samples several completions per prompt,
each is parsed with the same adapter and scored by the module's reward (:mod:`.module_rewards`); the
module then calls a new ``dspy.LM`` over the trained weights, saved as safetensors in
``<out>/weights/<name>/``. Every other module keeps its LM, its prompts and its demos.

Faults: a remote LM fails before any work (:class:`~.trained_lm.ModelNotTrainable`); a reward that raises
or returns NaN stops training (:class:`~.module_rewards.RewardError`) with the last checkpoint kept;
checkpoints under ``<out>/grpo/<name>/checkpoints`` every ``save_steps`` let an interrupted run resume
(``config.resume``); the student program is never modified (the result is a copy) and the final weights
are renamed into place only when complete. Groups in which every completion scored the same are counted
(TRL's ``frac_reward_zero_std``) and a run with (almost) no learning signal is reported as such.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter

from apexdsp.memory import release_memory
from apexdsp.optimizers.grpo_config import ModuleGRPOConfig, completion_length_for
from apexdsp.optimizers.grpo_tracking import (MlflowStepLogger, TimedGRPOTrainer, ZeroSignalMonitor,
                                              reward_curve_figure, timing_summary)
from apexdsp.optimizers.module_prompts import (ModulePrompt, ModulePromptCollector, as_questions,
                                               current_adapter, find_predictor, load_prompts, prompts_key,
                                               save_prompts, trainer_prompt)
from apexdsp.optimizers.module_rewards import ModuleReward, TRLRewardFunction, build_module_reward
from apexdsp.optimizers.trained_lm import (SETTINGS_DIGEST, copy_program, model_identity, module_lm, read_manifest,
                                           reusable_weights, save_trained_weights, settings_digest,
                                           trainable_model_dir, use_trained_lm, weights_dir)
from apexdsp.optimizers.trainer_checkpoints import last_checkpoint
from apexdsp.tracking.dspy_autolog import FollowsDSPyAutolog
from apexdsp.tracking.run import COMPILE_EXPERIMENT, run_active, tracked_run, write_json_atomic

logger = logging.getLogger(__name__)



@dataclass
class GRPOResult:
    """What one module's GRPO run produced and measured."""

    module: str
    weights: Path
    run_id: str | None
    steps: int
    prompts: int
    seconds: float
    reward_first: float | None = None
    reward_last: float | None = None
    timing: dict[str, float] = field(default_factory=dict)
    zero_std: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    reused: bool = False


class ModuleGRPO(FollowsDSPyAutolog, Teleprompter):
    """A DSPy teleprompter that GRPO-trains the weights of one module's LM.

    ``out_dir`` holds the run's files (``grpo/<name>/``: prompts, checkpoints, plot; ``weights/<name>/``:
    the trained model). ``retriever`` is handed to rewards that search (decomposition, frozen generator).
    """

    def __init__(self, out_dir: str | Path, config: ModuleGRPOConfig | None = None, *, module: str,
                 reward: str | ModuleReward | Any, reward_options: dict[str, Any] | None = None,
                 name: str | None = None, retriever: Any = None, experiment: str = COMPILE_EXPERIMENT,
                 collector: ModulePromptCollector | None = None):
        """``module``: the predictor (or the sub-module with one predictor) whose LM is trained; ``reward``:
        a module reward name (``optimizers.module_rewards.MODULE_REWARDS``), a ``ModuleReward``, or a
        function ``(question, outputs, completion_text) -> float``; ``name``: the weights folder's name."""
        super().__init__()
        self.out_dir = Path(out_dir)
        self.config = config or ModuleGRPOConfig()
        self.module = module
        self.reward = reward
        self.reward_options = dict(reward_options or {})
        self.name = name
        self.retriever = retriever
        self.experiment = experiment
        self.collector = collector
        self.result: GRPOResult | None = None

    def get_params(self) -> dict[str, Any]:
        """The settings as plain values (no retriever, collector or reward objects)."""
        reward = self.reward if isinstance(self.reward, str) else getattr(self.reward, "name", type(self.reward).__name__)
        return {"out_dir": str(self.out_dir), "module": self.module, "reward": reward, "name": self.name,
                "experiment": self.experiment, **_prefixed(self.config.to_dict())}

    def compile(self, student: dspy.Module, *, trainset: list[Any], teacher: Any = None,
                valset: Any = None) -> dspy.Module:
        """A copy of ``student`` whose module calls the GRPO-trained LM."""
        config = self.config
        reward, reward_options, name = self.reward, self.reward_options, self.name
        program = copy_program(student)
        module, predictor = find_predictor(program, self.module)
        config = completion_length_for(config, predictor)
        base_lm = module_lm(predictor)
        base_dir = trainable_model_dir(base_lm, module)  # fails here, before any slow work, for an API model
        name = name or module
        target = weights_dir(self.out_dir, name)
        work = self.out_dir / "grpo" / name
        digest = settings_digest(config, module=module, reward=reward, reward_options=reward_options,
                                 base_model=model_identity(base_dir),
                                 prompts=prompts_key(module, as_questions(trainset), program))
        if config.resume and reusable_weights(target, digest):
            logger.info("GRPO %s: trained weights already in %s; reusing them", module, target)
            use_trained_lm([predictor], target, base_lm)
            self.result = GRPOResult(module, target, None, read_manifest(target).get("steps", 0), 0, 0.0, reused=True)
            return program

        questions = as_questions(trainset)
        options = {"retriever": self.retriever} if self.retriever is not None else {}
        options.update(reward_options or {})
        output_field = next(iter(predictor.signature.output_fields)) if len(predictor.signature.output_fields) == 1 \
            else None
        module_reward = build_module_reward(reward, module=module, output_field=output_field, **options)
        prompts = self._prompts(program, module, questions, work / "prompts.json")
        adapter = current_adapter()
        reward_fn = TRLRewardFunction(module_reward, prompts, predictor.signature, adapter)

        params = {"module": module, "reward": module_reward.name, "base_model": str(base_dir),
                  "prompts": len(prompts), "questions": len(questions), **_prefixed(config.to_dict())}
        started = time.perf_counter()
        with tracked_run(self.experiment, run_name=f"grpo-{name}", params=params, nested=run_active(),
                         tags={"apexdsp.kind": "grpo", "apexdsp.module": module}) as run:
            trainer, monitor = self._trainer(config, base_dir, prompts, reward_fn, work, module)
            checkpoint = last_checkpoint(work / "checkpoints", digest) if config.resume else None
            if checkpoint:
                logger.info("GRPO %s: resuming from %s", module, checkpoint)
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            seconds = time.perf_counter() - started
            history = list(trainer.state.log_history)
            result = self._report(run, module, target, trainer, monitor, history, len(prompts), seconds, work)
            manifest = {"module": module, "reward": module_reward.name, "base_model": str(base_dir),
                        "steps": trainer.state.global_step, "config": config.to_dict(), "mlflow_run": run.run_id,
                        "lora_merged": config.use_lora, SETTINGS_DIGEST: digest}
            save_trained_weights(trainer.model, trainer.processing_class, target, manifest)
            run.log_json(manifest, f"weights/{name}/{target.name}-manifest.json")
        if not config.keep_checkpoints:  # the weights are saved: the checkpoints only cost disk from here
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
        del trainer
        release_memory()  # the trainer's model, optimizer state and cycles: 3 GB on SmolLM2 (apexdsp.memory)
        use_trained_lm([predictor], target, base_lm)
        self.result = result
        return program

    # -- steps ---------------------------------------------------------------------------------------------

    def _prompts(self, program: dspy.Module, module: str, questions, path: Path) -> list[ModulePrompt]:
        key = prompts_key(module, questions, program)
        prompts = load_prompts(path, key)
        if prompts is None:
            collector = self.collector or ModulePromptCollector(module)
            prompts = collector.collect(program, questions)
            save_prompts(path, prompts, key)
        return prompts

    def _trainer(self, config: ModuleGRPOConfig, base_dir: Path, prompts: list[ModulePrompt],
                 reward_fn: TRLRewardFunction, work: Path, module: str):
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.on_cpu() and config.num_threads:
            torch.set_num_threads(config.num_threads)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, config.dtype))
        align_end_of_turn(tokenizer, model)
        # Text prompts: TRL would render chat messages with a new assistant turn (see trainer_prompt).
        dataset = Dataset.from_list([{"prompt": trainer_prompt(p.messages, tokenizer), "example_index": i}
                                     for i, p in enumerate(prompts)])
        monitor = ZeroSignalMonitor(config.zero_std_warning, module)
        from apexdsp.optimizers.engine_rollout import EngineRollout

        rollout = EngineRollout() if config.rollout_engine == "apexdsp" else None
        trainer = TimedGRPOTrainer(model=model, reward_funcs=[reward_fn], args=config.to_trl(work / "checkpoints"),
                                   train_dataset=dataset, processing_class=tokenizer, peft_config=config.lora(),
                                   callbacks=[MlflowStepLogger(), monitor], rollout_func=rollout)
        return trainer, monitor

    def _report(self, run, module: str, target: Path, trainer, monitor: ZeroSignalMonitor,
                history: list[dict], prompts: int, seconds: float, work: Path) -> GRPOResult:
        import matplotlib.pyplot as plt

        rewards = [row["reward"] for row in history if "reward" in row]
        timing = timing_summary(history)
        warnings = [w for w in [monitor.warning()] if w]
        for warning in warnings:
            logger.warning(warning)
        run.log_metrics({**monitor.report.summary(), **{f"mean_{k}": v for k, v in timing.items()},
                         "compile_seconds": seconds})
        run.set_tags({"apexdsp.zero_signal_warning": warnings[0] if warnings else ""})
        figure = reward_curve_figure(history, title=f"GRPO reward: {module}")
        run.log_figure(figure, "reward_curve.png")
        figure.savefig(work / "reward_curve.png", dpi=100)
        plt.close(figure)
        result = GRPOResult(module, target, run.run_id, trainer.state.global_step, prompts, seconds,
                            rewards[0] if rewards else None, rewards[-1] if rewards else None, timing,
                            monitor.report.summary(), warnings)
        write_json_atomic({**result.__dict__, "weights": str(target), "history": history}, work / "result.json")
        return result


def align_end_of_turn(tokenizer: Any, model: Any) -> None:
    """Make the tokenizer's EOS the token that ends the model's turn (its generation config's EOS).

    TRL stops sampling at the tokenizer's EOS and rewrites the model's config to match it. A tokenizer
    converted from GGUF can name another token: SmolLM2's says ``<|im_start|>`` while its turns end with
    ``<|im_end|>``, and completions would then run past the end of the answer to the length limit
    (the local engine stops at either, so inference never showed it).
    """
    configured = getattr(model.generation_config, "eos_token_id", None)
    end = configured[0] if isinstance(configured, list) and configured else configured
    if isinstance(end, int) and end != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(end)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _prefixed(config: dict[str, Any]) -> dict[str, Any]:
    return {f"grpo.{k}": v for k, v in config.items()}


__all__ = ["COMPILE_EXPERIMENT", "GRPOResult", "ModuleGRPO"]
