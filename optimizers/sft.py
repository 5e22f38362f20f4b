"""Module SFT (APEX-Searcher's executor training): supervised fine-tuning of the LM behind some modules.

APEX-Searcher trains its executor by imitation before any RL. Here the examples come from the training
records' annotations (:mod:`.annotated_calls`: the calls a correct program would make, over what the real
index returns), from the program's own high-reward runs (:func:`~.sft_examples.collect_sft_examples`), or
both (``SFTStageConfig.source``). Each example is tokenized as the engine sends the call
(:func:`~.sft_examples.tokenize_example`) and ``trl.SFTTrainer`` trains on the reply tokens only; the
chosen predictors then call a new LM over the trained weights (``<out>/weights/<name>/``, safetensors),
every other predictor keeps its LM.

Affordable on a CPU: ``train_layers`` trains only the top decoder layers (and the final norm), so the
backward pass stops there; ``mixed_precision="bf16"`` runs the math under bfloat16 autocast with float32
weights; batches group examples of similar length. LoRA (``use_lora``) is the other way to train less.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import dspy
from dspy.teleprompt import Teleprompter

from apexdsp.errors import ApexError
from apexdsp.memory import release_memory
from apexdsp.optimizers.annotated_calls import AnnotatedReport, annotated_examples
from apexdsp.optimizers.grpo import align_end_of_turn
from apexdsp.optimizers.grpo_config import LoraOptions
from apexdsp.optimizers.grpo_tracking import MlflowStepLogger
from apexdsp.optimizers.sft_examples import (SFTExample, collect_sft_examples, module_predictors,
                                             tokenize_example)
from apexdsp.optimizers.trained_lm import (SETTINGS_DIGEST, copy_program, model_identity, module_lm,
                                           reusable_weights, save_trained_weights, settings_digest,
                                           trainable_model_dir, use_trained_lm, weights_dir)
from apexdsp.optimizers.trainer_checkpoints import last_checkpoint
from apexdsp.tracking.dspy_autolog import FollowsDSPyAutolog
from apexdsp.tracking.run import COMPILE_EXPERIMENT, run_active, tracked_run, write_json_atomic

logger = logging.getLogger(__name__)

SOURCES = ("annotated", "traces", "annotated+traces")


@dataclass
class SFTStageConfig(LoraOptions):
    """Settings of one SFT stage: the TRL fields that matter, with CPU-sane defaults."""

    # where the examples come from: calls rebuilt from annotations, the program's own successful runs, or both
    source: Literal["annotated", "traces", "annotated+traces"] = "annotated"
    max_examples: int | None = None  # keep the first N examples (after shuffling with ``seed``)
    learning_rate: float = 5e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides the epochs
    batch_size: int = 8
    max_length: int = 1024  # longer examples are dropped (counted), never cut
    seed: int = 0
    # train only the top N decoder layers and the final norm (None: every weight); the rest stays frozen
    train_layers: int | None = 8
    # "bf16": forward and backward under bfloat16 autocast, weights in float32 (as ModuleGRPOConfig)
    mixed_precision: Literal["no", "bf16"] = "no"
    group_by_length: bool = True
    lora_dropout: float = 0.0  # peft's default; the other LoRA settings: see LoraOptions
    save_steps: int = 50
    save_total_limit: int = 2
    keep_checkpoints: bool = False  # checkpoints are removed once the trained weights are saved
    resume: bool = True
    use_cpu: bool | None = None
    dtype: str = "float32"
    num_threads: int | None = 2
    trl_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ApexError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ApexError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.train_layers is not None and self.train_layers < 1:
            raise ApexError(f"train_layers must be at least 1 (or None for every weight), got {self.train_layers}")
        if self.train_layers is not None and self.use_lora:
            raise ApexError("train_layers and use_lora are two ways to train less: choose one")
        if self.max_examples is not None and self.max_examples < 1:
            raise ApexError(f"max_examples must be at least 1, got {self.max_examples}")

    def to_trl(self, output_dir: str | Path) -> Any:
        import torch
        from trl import SFTConfig

        use_cpu = self.use_cpu if self.use_cpu is not None else not torch.cuda.is_available()
        settings = dict(output_dir=str(output_dir), learning_rate=self.learning_rate,
                        num_train_epochs=self.num_train_epochs, max_steps=self.max_steps,
                        per_device_train_batch_size=self.batch_size, max_length=self.max_length, seed=self.seed,
                        completion_only_loss=True, logging_steps=1, save_strategy="steps", save_steps=self.save_steps,
                        save_total_limit=self.save_total_limit, report_to="none", use_cpu=use_cpu,
                        bf16=self.dtype == "bfloat16" or self.mixed_precision == "bf16", fp16=False,
                        group_by_length=self.group_by_length, dataloader_num_workers=0,
                        disable_tqdm=False)
        settings.update(self.trl_overrides)
        return SFTConfig(**settings)


def freeze_below_top_layers(model: Any, layers: int) -> int:
    """Leave only the top ``layers`` decoder layers and the final norm trainable; returns the trainable
    parameter count. Works on the decoder-only models transformers builds as ``model.model.layers``."""
    decoder = getattr(model, "model", None)
    blocks = getattr(decoder, "layers", None)
    if blocks is None:
        raise ApexError(f"train_layers: {type(model).__name__} has no model.layers; use use_lora instead")
    if layers > len(blocks):
        raise ApexError(f"train_layers={layers}, but the model has {len(blocks)} layers")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in [*blocks[-layers:], getattr(decoder, "norm", None)]:
        if module is not None:
            for parameter in module.parameters():
                parameter.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ModuleSFT(FollowsDSPyAutolog, Teleprompter):
    """SFT of the LM behind some predictors (``modules``: names, or sub-modules whose predictors are all
    meant) with ``trl.SFTTrainer``. ``retriever`` is the index annotated calls are rebuilt over.

    From traces, a run is kept when its ``reward`` (a registered name) reaches ``min_reward``, or, with
    ``metric`` (DSPy's ``metric(example, prediction, trace)``, for a program of one's own), when the metric
    does; ``compile(..., teacher=)`` imitates a teacher program's runs instead of the student's own."""

    def __init__(self, out_dir: str | Path, config: SFTStageConfig | None = None, *,
                 modules: tuple[str, ...] = ("executor.analyze",), retriever: Any = None, reward: str = "answer_f1",
                 min_reward: float = 1.0, name: str | None = None, experiment: str = COMPILE_EXPERIMENT,
                 metric: Any = None):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.config = config or SFTStageConfig()
        self.modules = tuple(modules)
        self.retriever = retriever
        self.reward = reward
        self.min_reward = min_reward
        self.metric = metric
        self.name = name
        self.experiment = experiment
        self.examples: list[SFTExample] = []
        self.report: dict[str, Any] = {}
        self._annotated: AnnotatedReport | None = None  # the drops by reason, when examples came from annotations

    def get_params(self) -> dict[str, Any]:
        """The settings as plain values (no retriever or metric object: the metric by its name)."""
        metric = None if self.metric is None else getattr(self.metric, "__name__", type(self.metric).__name__)
        return {"out_dir": str(self.out_dir), "modules": list(self.modules), "reward": self.reward,
                "min_reward": self.min_reward, "metric": metric, "name": self.name, "experiment": self.experiment,
                **{f"sft.{k}": list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}}

    def compile(self, student: dspy.Module, *, trainset: list[Any] | None = None, teacher: Any = None,
                valset: Any = None, examples: list[SFTExample] | None = None) -> dspy.Module:
        """A copy of ``student`` whose chosen predictors call the fine-tuned LM."""
        config = self.config
        program = copy_program(student)
        predictors = module_predictors(program, self.modules)
        lms = {id(module_lm(p)): module_lm(p) for p in predictors.values()}
        if len(lms) != 1:
            raise ApexError(f"the predictors {list(predictors)} use {len(lms)} different LMs; SFT trains one")
        base_lm = next(iter(lms.values()))
        base_dir = trainable_model_dir(base_lm, ",".join(predictors))
        name = self.name or "+".join(self.modules)
        target, work = weights_dir(self.out_dir, name), self.out_dir / "sft" / name
        digest = settings_digest(config, modules=list(predictors), reward=self._judge, min_reward=self.min_reward,
                                 base_model=model_identity(base_dir), teacher=teacher,
                                 data=examples if examples is not None else trainset)
        if config.resume and reusable_weights(target, digest):
            use_trained_lm(list(predictors.values()), target, base_lm)
            return program
        if examples is None:
            if trainset is None:
                raise ApexError("SFT needs a trainset to build examples from, or examples=")
            examples = self._examples(program, trainset, predictors, teacher)
        if not examples:
            raise ApexError(f"SFT of {', '.join(predictors)}: no usable example ({self._why_none(predictors)})")
        self.examples = examples
        params = {"modules": ",".join(predictors), "examples": len(examples), "reward": self._judge,
                  "min_reward": self.min_reward, "base_model": str(base_dir),
                  **{f"sft.{k}": v for k, v in asdict(config).items()}}
        started = time.perf_counter()
        with tracked_run(self.experiment, run_name=f"sft-{name}", params=params, nested=run_active(),
                         tags={"apexdsp.kind": "sft"}) as run:
            trainer = self._trainer(base_dir, examples, work)
            checkpoint = last_checkpoint(work / "checkpoints", digest) if config.resume else None
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            seconds = time.perf_counter() - started
            tokens = sum(len(row["input_ids"]) for row in trainer.train_dataset)
            self.report.update(seconds=seconds, steps=trainer.state.global_step, examples=len(examples),
                               tokens=tokens, seconds_per_100_examples=100 * seconds / len(examples))
            run.log_metrics({"compile_seconds": seconds, "sft_examples": len(examples), "sft_tokens": tokens,
                             "seconds_per_100_examples": self.report["seconds_per_100_examples"]})
            run.log_json(self.report, "sft_report.json")
            save_trained_weights(trainer.model, trainer.processing_class, target,
                                 {"modules": list(predictors), "kind": "sft", "examples": len(examples),
                                  "steps": trainer.state.global_step, "base_model": str(base_dir),
                                  "source": config.source, "mlflow_run": run.run_id, SETTINGS_DIGEST: digest})
        write_json_atomic(self.report, work / "report.json")
        if not config.keep_checkpoints:
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
        del trainer
        release_memory()  # the trainer's model, optimizer state and cycles; see apexdsp.memory
        use_trained_lm(list(predictors.values()), target, base_lm)
        return program

    @property
    def _judge(self) -> str:
        """What keeps a traced run: the metric's name, or the reward's."""
        return f"metric:{getattr(self.metric, '__name__', 'metric')}" if self.metric is not None else self.reward

    def _examples(self, program: dspy.Module, trainset: list[Any], predictors: dict[str, dspy.Predict],
                  teacher: dspy.Module | None = None) -> list[SFTExample]:
        import random

        config = self.config
        examples: list[SFTExample] = []
        if "annotated" in config.source:
            annotated = AnnotatedReport()
            examples += annotated_examples(program, trainset, predictors, retriever=self.retriever, report=annotated)
            self.report["annotated"] = annotated.summary()
            self._annotated = annotated
        if "traces" in config.source:
            traced = collect_sft_examples(program, trainset, modules=tuple(predictors), reward=self.reward,
                                          min_reward=self.min_reward, metric=self.metric, teacher=teacher)
            self.report["traces"] = {"kept": len(traced), "questions": len(trainset)}
            examples += traced
        random.Random(config.seed).shuffle(examples)
        return examples[: config.max_examples] if config.max_examples else examples

    def _why_none(self, predictors: dict[str, dspy.Predict]) -> str:
        reasons = []
        annotated = self._annotated
        if annotated is not None:
            reasons += [f"{name} from annotations: {annotated.why_none(name)} dropped" for name in predictors]
        if "traces" in self.report:
            reasons.append(f"no run of {self.report['traces']['questions']} reached {self._judge} >= "
                           f"{self.min_reward}")
        return "; ".join(reasons) or "none given"

    def _trainer(self, base_dir: Path, examples: list[SFTExample], work: Path):
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTTrainer

        config = self.config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, config.dtype))
        align_end_of_turn(tokenizer, model)
        rows, too_long = [], 0
        for example in examples:
            try:
                rows.append(tokenize_example(example, tokenizer, config.max_length))
            except ApexError:
                too_long += 1
        self.report["dropped_over_max_length"] = too_long
        if not rows:
            raise ApexError(f"every SFT example is over max_length {config.max_length} tokens")
        if config.train_layers is not None:
            self.report["trainable_parameters"] = freeze_below_top_layers(model, config.train_layers)
        return SFTTrainer(model=model, args=config.to_trl(work / "checkpoints"), train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=config.lora(), callbacks=[MlflowStepLogger()])


__all__ = ["ModuleSFT", "SFTExample", "SFTStageConfig", "collect_sft_examples", "freeze_below_top_layers",
           "module_predictors"]
