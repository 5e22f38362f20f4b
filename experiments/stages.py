"""Compile-stage kinds a spec can name, mapped to the optimizers that run them.

The runner knows a stage only through :class:`StageContext` and one function, ``run(program, settings,
context) -> compiled program``. Each kind imports its optimizer lazily, when the stage runs, so a spec can
be checked (and its other steps run) on a checkout where an optimizer is not built yet; running such a
stage raises :class:`StageUnavailable` naming the missing module, never a stand-in result.

``labeled`` is DSPy's own ``LabeledFewShot`` (gold question/answer pairs as demos): no traces, no LM
calls, useful as a cheap real baseline stage.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apexdsp.errors import ApexError


class StageUnavailable(ApexError):
    """A stage whose optimizer cannot be imported in this checkout."""


@dataclass
class StageContext:
    """What a stage gets besides the program: its data, a seed, a folder to keep checkpoints in."""

    trainset: list[Any]  # apexdsp.data.records.Question
    valset: list[Any]
    seed: int
    work_dir: Path  # the step's cache folder: checkpoints written here survive an interrupted stage
    retriever: Any = None
    threads: int = 8
    metrics: dict[str, float] = field(default_factory=dict)  # the stage reports its figures here
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # per-step curves (rewards)


StageFunction = Callable[[Any, dict[str, Any], StageContext], Any]

BOOTSTRAP_CHECKPOINT = "bootstrap.checkpoint.json"  # in the compile step's folder: an interrupted run resumes


# Trainer settings that change how a stage runs, not what it computes (checkpointing, logging, threads,
# micro-batches that accumulate to the same step).
TRAINER_EXECUTION_SETTINGS = frozenset({"save_steps", "save_total_limit", "logging_steps", "resume", "num_threads",
                                        "micro_batch_size", "gradient_checkpointing", "keep_checkpoints"})


@dataclass(frozen=True)
class StageKind:
    """A stage a spec can name. ``execution_settings``: the settings that change how it runs, not what it
    computes; they are left out of the step's key, so a long stage can be made to checkpoint more often or
    use less memory without recomputing it or what follows."""

    name: str
    optimizer: str  # "module:attribute" of the optimizer, for messages and docs
    run: StageFunction
    description: str
    config: str | None = None  # "module:attribute" of its settings class, when separate
    check: Callable[[dict[str, Any]], Any] | None = None  # raises ValueError for bad settings
    execution_settings: frozenset[str] = frozenset()
    progress: Callable[[Path], str | None] | None = None  # how far an unfinished stage got, from its folder

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Check settings while the spec is read; an optimizer not importable yet is checked when it runs."""
        if self.check is None:
            return
        try:
            self.check(settings)
        except StageUnavailable:
            return


def import_optimizer(target: str, kind: str) -> Any:
    """``module:attribute``, or :class:`StageUnavailable` saying which optimizer is missing."""
    module_name, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise StageUnavailable(f"stage kind {kind!r} needs {target}, which cannot be imported in this checkout "
                               f"({type(error).__name__}: {error})") from None


def _examples(questions: list[Any]) -> list[Any]:
    from apexdsp.data.examples import to_examples

    return to_examples(questions)


def _numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- labeled (DSPy's LabeledFewShot) ------------------------------------------------------------------

def _check_labeled(settings: dict[str, Any]) -> None:
    unknown = sorted(set(settings) - {"k"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown setting; known: k")
    if not isinstance(settings.get("k", 4), int) or settings.get("k", 4) < 1:
        raise ValueError(f"k: must be a positive integer, got {settings.get('k')!r}")


def _labeled(program: Any, settings: dict[str, Any], context: StageContext) -> Any:
    import dspy

    _check_labeled(settings)
    k = int(settings.get("k", 4))
    compiled = dspy.LabeledFewShot(k=k).compile(program, trainset=_examples(context.trainset), sample=True)
    context.metrics["demos_per_module"] = float(min(k, len(context.trainset)))
    return compiled


# -- bootstrap (optimizers/bootstrap.py) ------------------------------------------------------------------

def _settings_config(target: str, kind: str, settings: dict[str, Any]) -> Any:
    """A stage's pydantic settings class (``module:attribute``) built from ``settings``; the first error
    names its key."""
    from pydantic import ValidationError

    config_class = import_optimizer(target, kind)
    try:
        return config_class(**settings)
    except ValidationError as error:
        first = error.errors()[0]
        raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _bootstrap_config(settings: dict[str, Any]) -> Any:
    return _settings_config("apexdsp.optimizers.config:BootstrapConfig", "bootstrap", settings)


def _bootstrap(program: Any, settings: dict[str, Any], context: StageContext) -> Any:
    optimizer_class = import_optimizer(STAGE_KINDS["bootstrap"].optimizer, "bootstrap")
    config = _bootstrap_config({"seed": context.seed, "threads": context.threads, **settings})
    # The teacher's pass over the trainset and each candidate's over the valset are kept as they finish:
    # an interrupted step resumes from them instead of starting over.
    optimizer = optimizer_class(config, retriever=context.retriever,
                                checkpoint=context.work_dir / BOOTSTRAP_CHECKPOINT)
    compiled = optimizer.compile(program, trainset=context.trainset, valset=context.valset or None)
    report = optimizer.report
    if report is not None:
        context.metrics.update(_numbers(report.model_dump(exclude={"candidates", "demos", "passed"})))
        context.metrics.update(_numbers(report.passed, "passed_"))
        context.metrics.update(_numbers(report.best(), "chosen_"))
        context.metrics["demos_chosen"] = float(sum(d.chosen for d in report.demos))
        context.metrics.update(_calibration_metrics(report.calibration))
    return compiled


# -- calibrate (optimizers/calibration.py) ----------------------------------------------------------------

def _calibration_config(settings: dict[str, Any]) -> Any:
    return _settings_config("apexdsp.optimizers.calibration:CalibrationConfig", "calibrate", settings)


def _calibration_metrics(report: Any) -> dict[str, float]:
    """Per choice step: its offset and how many training calls it answered right before and after."""
    metrics: dict[str, float] = {}
    for fit in getattr(report, "predictors", None) or []:
        if fit.skipped is None:
            metrics.update(_numbers({"offset": fit.offset, "raw_correct": fit.raw_correct, "calls": fit.calls,
                                     "calibrated_correct": fit.calibrated_correct},
                                    f"calibration.{fit.predictor}."))
    return metrics


def _calibrate(program: Any, settings: dict[str, Any], context: StageContext) -> Any:
    optimizer_class = import_optimizer(STAGE_KINDS["calibrate"].optimizer, "calibrate")
    optimizer = optimizer_class(_calibration_config({"threads": context.threads, **settings}))
    compiled = optimizer.compile(program, trainset=context.trainset)
    context.metrics.update(_calibration_metrics(optimizer.report))
    return compiled


# -- grpo / sft (optimizers/grpo.py, optimizers/sft.py) -------------------------------------------------

_GRPO_CALL = ("module", "reward", "reward_options", "name")


def _check_trainer(kind: str, settings: dict[str, Any], call_keys: tuple[str, ...]) -> None:
    """Settings of a weight-training stage: its reward by name, the rest accepted by its config class."""
    if kind == "grpo" and "module" not in settings:
        raise ValueError("module: required (the module whose LM is trained)")
    modules = settings.get("modules", ["executor"])
    if kind == "sft" and (not isinstance(modules, list) or not all(isinstance(m, str) for m in modules)):
        raise ValueError("modules: a list of module names, e.g. [\"executor\"]")
    reward = settings.get("reward")
    if isinstance(reward, str):
        known = _known_rewards(kind)
        if reward not in known:
            raise ValueError(f"reward: unknown reward {reward!r}; known: {', '.join(sorted(known))}")
    try:
        config_class = import_optimizer(STAGE_KINDS[kind].config, kind)
    except StageUnavailable:
        return  # checked when the stage runs (and fails there with the import error)
    try:
        config_class(**{k: v for k, v in settings.items() if k not in call_keys})
    except (TypeError, ApexError) as error:
        raise ValueError(str(error)) from None


def _known_rewards(kind: str) -> Iterable[str]:
    """GRPO scores one module's completions (the module rewards of ``optimizers.module_rewards``); SFT
    filters whole trajectories (the rewards of ``apexdsp.rewards``)."""
    if kind == "grpo":
        from apexdsp.optimizers.module_rewards import MODULE_REWARDS

        return MODULE_REWARDS
    import apexdsp.rewards  # noqa: F401 - registers the built-in rewards
    from apexdsp.rewards.base import REWARDS

    return REWARDS


def _trainer_history(work_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-step reward figures from the newest transformers ``trainer_state.json`` under ``work_dir``."""
    import json

    states = sorted(work_dir.rglob("trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    history: dict[str, list[tuple[int, float]]] = {}
    for entry in json.loads(states[-1].read_text()).get("log_history", []):
        for key, value in entry.items():
            if "reward" in key and isinstance(value, (int, float)) and "step" in entry:
                history.setdefault(key, []).append((int(entry["step"]), float(value)))
    return history


def _trainer_stage(kind: str, program: Any, settings: dict[str, Any], context: StageContext) -> Any:
    optimizer_class = import_optimizer(STAGE_KINDS[kind].optimizer, kind)
    config_class = import_optimizer(STAGE_KINDS[kind].config, kind)
    call = {k: v for k, v in settings.items() if k in _GRPO_CALL}
    config = config_class(**{"seed": context.seed, **{k: v for k, v in settings.items() if k not in _GRPO_CALL}})
    if kind == "grpo":  # no reward named: the module's default (decomposition for a planner, ...)
        from apexdsp.optimizers.schedule import Stage

        call["reward"] = Stage("grpo", call["module"], call.get("reward")).resolved_reward()
    else:
        call.setdefault("reward", "answer_f1")
    optimizer = optimizer_class(context.work_dir, config, retriever=context.retriever, **call)
    compiled = optimizer.compile(program, trainset=context.trainset, valset=context.valset or None)
    result = getattr(optimizer, "result", None)
    if result is not None:
        figures = {k: v for k, v in vars(result).items() if k in ("steps", "prompts", "seconds", "reward_first",
                                                                  "reward_last") and v is not None}
        context.metrics.update(_numbers(figures))
        # already namespaced by the trainer ("time/generation_s", "zero_std/mean_fraction")
        context.metrics.update(_numbers(getattr(result, "timing", {}) or {}))
        context.metrics.update(_numbers(getattr(result, "zero_std", {}) or {}))
    context.history.update(_trainer_history(context.work_dir))
    return compiled


_SFT_CALL = ("modules", "reward", "min_reward", "name")


def _sft_stage(program: Any, settings: dict[str, Any], context: StageContext) -> Any:
    """APEX-Searcher's executor SFT: imitate annotated calls and/or the program's own high-reward runs."""
    optimizer_class = import_optimizer(STAGE_KINDS["sft"].optimizer, "sft")
    config_class = import_optimizer(STAGE_KINDS["sft"].config, "sft")
    call = {k: v for k, v in settings.items() if k in _SFT_CALL}
    if "modules" in call:
        call["modules"] = tuple(call["modules"])
    config = config_class(**{"seed": context.seed, **{k: v for k, v in settings.items() if k not in _SFT_CALL}})
    optimizer = optimizer_class(context.work_dir, config, retriever=context.retriever, **call)
    compiled = optimizer.compile(program, trainset=context.trainset)
    context.metrics["sft_examples"] = float(len(optimizer.examples))
    context.history.update(_trainer_history(context.work_dir))
    return compiled


def _bootstrap_progress(work_dir: Path) -> str | None:
    """How far an interrupted bootstrap got, from its checkpoint."""
    from apexdsp.optimizers.checkpoint import CompileCheckpoint

    return CompileCheckpoint.describe(work_dir / BOOTSTRAP_CHECKPOINT)


def _trainer_progress(work_dir: Path) -> str | None:
    """The last checkpoint of an interrupted GRPO or SFT run (``<kind>/<module>/checkpoints/checkpoint-N``)."""
    import json

    from apexdsp.optimizers.trainer_checkpoints import last_checkpoint

    found = [c for c in map(last_checkpoint, work_dir.glob("*/*/checkpoints")) if c is not None]
    if not found:
        return None
    newest = max(found, key=lambda path: int(path.name.split("-")[-1]))
    state = json.loads((newest / "trainer_state.json").read_text())
    return f"checkpoint at step {state.get('global_step')} of {state.get('max_steps')}"


STAGE_KINDS: dict[str, StageKind] = {
    "bootstrap": StageKind("bootstrap", "apexdsp.optimizers.bootstrap:RewardBootstrap", _bootstrap,
                           "reward-filtered few-shot bootstrapping with random search",
                           check=lambda settings: _bootstrap_config(settings),
                           execution_settings=frozenset({"threads", "progress"}), progress=_bootstrap_progress),
    "grpo": StageKind("grpo", "apexdsp.optimizers.grpo:ModuleGRPO",
                      lambda p, s, c: _trainer_stage("grpo", p, s, c),
                      "GRPO on one module's LM with that module's reward",
                      config="apexdsp.optimizers.grpo_config:ModuleGRPOConfig",
                      check=lambda settings: _check_trainer("grpo", settings, _GRPO_CALL),
                      execution_settings=TRAINER_EXECUTION_SETTINGS, progress=_trainer_progress),
    "sft": StageKind("sft", "apexdsp.optimizers.sft:ModuleSFT", _sft_stage,
                     "supervised fine-tuning of modules on annotated calls or high-reward trajectories",
                     config="apexdsp.optimizers.sft:SFTStageConfig",
                     check=lambda settings: _check_trainer("sft", settings, _SFT_CALL),
                     execution_settings=TRAINER_EXECUTION_SETTINGS, progress=_trainer_progress),
    "calibrate": StageKind("calibrate", "apexdsp.optimizers.calibration:ChoiceCalibration", _calibrate,
                           "offsets of the yes/no and A/B answer steps fitted on the trainset (no weights)",
                           check=lambda settings: _calibration_config(settings),
                           execution_settings=frozenset({"threads", "progress"})),
    "labeled": StageKind("labeled", "dspy:LabeledFewShot", _labeled,
                         "DSPy's LabeledFewShot: k gold question/answer demos per module", check=_check_labeled),
}


def register_stage(kind: StageKind) -> None:
    """Make a stage kind available to specs (a user's own optimizer)."""
    STAGE_KINDS[kind.name] = kind


def stage_labels(names: list[str]) -> list[str]:
    """Cumulative labels of the compiled programs: ``[bootstrap, grpo]`` -> ``[bootstrap, bootstrap+grpo]``."""
    return ["+".join(names[: i + 1]) for i in range(len(names))]


def run_stage(kind: str, program: Any, settings: dict[str, Any], context: StageContext) -> Any:
    """Run one stage; the compiled program it returns replaces ``program`` for the next stage."""
    return STAGE_KINDS[kind].run(program, settings, context)
