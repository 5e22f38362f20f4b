"""Progressive multi-agent training (OPERA's MAPGRPO) and QAgent's two stages, as lists of stages.

MAPGRPO trains the modules of a program one after another, each on its own reward, with the modules
trained before it frozen at their trained weights: a later module's prompts are collected by running
the program *as trained so far*, so it learns to work with what the earlier modules now produce.
QAgent trains its search step twice: first on the end-to-end answer reward, then on the
frozen-generator reward, the second stage starting from the first one's weights.

A schedule is a list of :class:`Stage`; :class:`ProgressiveSchedule` runs it as one MLflow run with a
child run per stage. Each stage writes its weights to ``<out>/weights/<stage name>/``; a finished stage
is found there and skipped when the schedule is run again, so an interrupted schedule resumes at the
stage it was in (and that stage at its last checkpoint).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dspy
from dspy.teleprompt import Teleprompter

from apexdsp.errors import ApexError
from apexdsp.optimizers.calibration import ChoiceCalibration
from apexdsp.optimizers.grpo import ModuleGRPO
from apexdsp.optimizers.grpo_config import ModuleGRPOConfig
from apexdsp.optimizers.module_rewards import DEFAULT_MODULE_REWARDS
from apexdsp.optimizers.sft import ModuleSFT, SFTStageConfig
from apexdsp.tracking.dspy_autolog import FollowsDSPyAutolog
from apexdsp.tracking.run import COMPILE_EXPERIMENT, run_active, tracked_run

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    """One stage: GRPO of one module on one reward, SFT of some modules, or the choice calibration
    (``calibrate``: no weights, the yes/no and A/B steps' offsets; :mod:`.calibration`)."""

    kind: Literal["grpo", "sft", "calibrate"]
    module: str
    reward: str | None = None  # GRPO: a module reward name (default: DEFAULT_MODULE_REWARDS[module])
    reward_options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None  # weights folder name; default: the module
    grpo: ModuleGRPOConfig | None = None
    sft: SFTStageConfig | None = None

    def resolved_reward(self) -> str:
        reward = self.reward or DEFAULT_MODULE_REWARDS.get(self.module)
        if reward is None:  # "planner" for "planner.write_plan": a module with one predictor that has a default
            inner = {r for name, r in DEFAULT_MODULE_REWARDS.items() if name.startswith(self.module + ".")}
            reward = inner.pop() if len(inner) == 1 else None
        if reward is None:
            raise ApexError(f"stage {self.kind}({self.module}) names no reward and the module has no default; "
                            f"defaults exist for: {', '.join(sorted(DEFAULT_MODULE_REWARDS))}")
        return reward

    @property
    def label(self) -> str:
        return self.name or self.module

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules an SFT stage trains together on one LM: ``sft(reader.decide,reader.choose)``."""
        return tuple(part.strip() for part in self.module.split(",") if part.strip())


# OPERA's order: the planner first, then the executor's analysis-answer step, then its rewrite step.
MAPGRPO_ORDERS: dict[str, list[tuple[str, str]]] = {
    "apex": [("planner.write_plan", "decomposition"), ("executor.analyze", "answer"),
             ("executor.rewrite", "frozen_generator")],
    "opera": [("planner.write_plan", "decomposition"), ("executor.analyze", "answer"),
              ("executor.rewrite", "frozen_generator")],
}


def mapgrpo_stages(program: str, config: ModuleGRPOConfig | None = None,
                   modules: list[str] | None = None) -> list[Stage]:
    """MAPGRPO's stages for ``program`` (optionally only ``modules``, in the program's order); for
    ``qagent``, its two stages on the query writer."""
    if program == "qagent":
        return qagent_stages(config)
    try:
        order = MAPGRPO_ORDERS[program]
    except KeyError:
        raise ApexError(f"no MAPGRPO order for {program!r}; known: {', '.join(MAPGRPO_ORDERS)}") from None
    chosen = [(m, r) for m, r in order if modules is None or m in modules or m.split(".")[0] in modules]
    return [Stage("grpo", module, reward, grpo=config) for module, reward in chosen]


def qagent_stages(config: ModuleGRPOConfig | None = None, module: str = "write_queries") -> list[Stage]:
    """QAgent's two stages on its query-writing step: end-to-end answer (F1 of the answer read from the
    retrieved documents by the agent's own reader LM), then the frozen-generator reward."""
    return [Stage("grpo", module, "search_answer", name=f"{module}.stage1", grpo=config),
            Stage("grpo", module, "frozen_generator", name=module, grpo=config)]


_STAGE = re.compile(r"^(grpo|sft)\(([\w.]+(?:,[\w.]+)*)(?::(\w+))?\)$")


def parse_stages(spec: str, config: ModuleGRPOConfig | None = None,
                 sft_config: SFTStageConfig | None = None, program: str | None = None) -> list[Stage]:
    """``"sft(reader.generate)+grpo(planner)+grpo(executor.analyze:answer)"`` -> stages (``bootstrap`` is
    skipped: that is the prompt stage, run before these); ``sft(reader.decide,reader.choose)`` trains several
    predictors on one LM. ``mapgrpo`` stands for the program's MAPGRPO
    schedule (:data:`MAPGRPO_ORDERS`; QAgent's two stages for ``qagent``)."""
    stages = []
    for part in (p.strip() for p in spec.split("+") if p.strip()):
        if part == "bootstrap":
            continue
        if part == "mapgrpo":
            if program is None:
                raise ApexError(f"{spec!r}: 'mapgrpo' needs the program's name to know its modules")
            stages.extend(mapgrpo_stages(program, config))
            continue
        if part == "calibrate":
            stages.append(Stage("calibrate", "choices"))
            continue
        match = _STAGE.match(part)
        if match is None:
            raise ApexError(f"bad stage {part!r} in {spec!r}; write grpo(MODULE), grpo(MODULE:REWARD), sft(MODULE), "
                            "mapgrpo or calibrate")
        kind, module, reward = match.groups()
        if kind == "grpo" and "," in module:
            raise ApexError(f"bad stage {part!r} in {spec!r}: GRPO trains one module per stage; "
                            "only sft(...) takes several, comma-separated")
        stages.append(Stage(kind, module, reward, grpo=config, sft=sft_config))  # type: ignore[arg-type]
    if not stages:
        raise ApexError(f"{spec!r} names no training stage")
    return stages


class ProgressiveSchedule(FollowsDSPyAutolog, Teleprompter):
    """Runs stages in order, each on the program as trained by the stages before it."""

    def __init__(self, stages: list[Stage], out_dir: str | Path, *, retriever: Any = None,
                 experiment: str = COMPILE_EXPERIMENT):
        super().__init__()
        if not stages:
            raise ApexError("a schedule needs at least one stage")
        self.stages = stages
        self.out_dir = Path(out_dir)
        self.retriever = retriever
        self.experiment = experiment
        self.results: list[Any] = []

    def get_params(self) -> dict[str, Any]:
        """The settings as plain values (no retriever): each stage's kind, module, reward and config."""
        from dataclasses import asdict

        def plain(value: Any) -> Any:
            if value is None or isinstance(value, (str, int, float, bool)):
                return value
            if isinstance(value, dict):
                return {str(key): plain(item) for key, item in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(item) for item in value]
            return getattr(value, "name", None) or getattr(value, "__name__", None) or type(value).__name__

        def reward(stage: Stage) -> Any:
            if stage.kind != "grpo":
                return None
            try:
                return plain(stage.resolved_reward())
            except ApexError:  # no default for the module: check() names it before any work
                return plain(stage.reward)

        stages = [{"kind": stage.kind, "module": stage.module, "reward": reward(stage),
                   "reward_options": plain(stage.reward_options), "name": stage.name,
                   "grpo": plain(asdict(stage.grpo)) if stage.grpo is not None else None,
                   "sft": plain(asdict(stage.sft)) if stage.sft is not None else None} for stage in self.stages]
        return {"out_dir": str(self.out_dir), "experiment": self.experiment, "stages": stages}

    def check(self, program: dspy.Module) -> None:
        """Refuse, before any work, a stage whose module the program lacks, a reward that does not exist,
        or SFT from annotations that cannot be rebuilt (no such calls, no index)."""
        from apexdsp.optimizers.annotated_calls import synthesizer_for
        from apexdsp.optimizers.module_prompts import resolve_module
        from apexdsp.optimizers.module_rewards import MODULE_REWARDS
        from apexdsp.optimizers.sft_examples import module_predictors

        names = [name for name, _ in program.named_predictors()]
        for stage in self.stages:
            where = f"stage {stage.kind}({stage.module})"
            try:
                if stage.kind == "grpo":
                    resolve_module(names, stage.module)
                    if stage.resolved_reward() not in MODULE_REWARDS:
                        raise ApexError(f"unknown reward {stage.resolved_reward()!r}; known: "
                                        f"{', '.join(sorted(MODULE_REWARDS))}")
                elif stage.kind == "sft":
                    chosen = module_predictors(program, stage.modules)
                    if "annotated" in (stage.sft or SFTStageConfig()).source:
                        if self.retriever is None:
                            raise ApexError("SFT from annotations needs the index the program searches")
                        for name in chosen:
                            synthesizer_for(program, name)
            except ApexError as error:
                raise ApexError(f"{where}: {error}") from None

    def compile(self, student: dspy.Module, *, trainset: list[Any], teacher: Any = None,
                valset: Any = None) -> dspy.Module:
        self.check(student)
        program = student
        labels = [f"{s.kind}({s.module})" for s in self.stages]
        with tracked_run(self.experiment, run_name="schedule", nested=run_active(),
                         params={"stages": " -> ".join(labels)}, tags={"apexdsp.kind": "schedule"}) as run:
            for index, stage in enumerate(self.stages, start=1):
                logger.info("stage %d/%d: %s", index, len(self.stages), labels[index - 1])
                program = self._run(stage, program, trainset)
                run.log_metrics({"stages_done": index})
        return program

    def _run(self, stage: Stage, program: dspy.Module, trainset: list[Any]) -> dspy.Module:
        if stage.kind == "calibrate":
            calibration = ChoiceCalibration()
            calibrated = calibration.compile(program, trainset=trainset)
            self.results.append(calibration.report)
            return calibrated
        if stage.kind == "sft":
            sft = ModuleSFT(self.out_dir, stage.sft, modules=stage.modules, retriever=self.retriever,
                            name=stage.name, experiment=self.experiment)
            trained = sft.compile(program, trainset=trainset)
            self.results.append(sft)
            return trained
        reward_options = dict(stage.reward_options)
        if stage.resolved_reward() == "search_answer" and "reader" not in reward_options:
            reward_options["reader"] = _own_reader(program)
        grpo = ModuleGRPO(self.out_dir, stage.grpo, module=stage.module, reward=stage.resolved_reward(),
                          reward_options=reward_options, name=stage.label, retriever=self.retriever,
                          experiment=self.experiment)
        trained = grpo.compile(program, trainset=trainset)
        self.results.append(grpo.result)
        return trained


def _own_reader(program: dspy.Module) -> Any:
    """A reader over the LM the program's own answer step uses (QAgent stage 1's end-to-end reward)."""
    from apexdsp.optimizers.trained_lm import module_lm
    from apexdsp.rewards import FrozenGenerator

    predictors = dict(program.named_predictors())
    reader = predictors.get("reader.generate") or predictors.get("answer_step.generate")
    return FrozenGenerator(module_lm(reader) if reader is not None else None)


__all__ = ["MAPGRPO_ORDERS", "ProgressiveSchedule", "Stage", "mapgrpo_stages", "parse_stages", "qagent_stages"]
