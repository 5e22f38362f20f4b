"""apexdsp.optimizers: DSPy optimizers (``Teleprompter``\\ s) that compile apexdsp programs, and the saved form.

Every optimizer takes its settings in ``__init__`` and answers DSPy's ``compile(student, *, trainset,
valset=None, teacher=None)``, returning a new program (the student is never modified):

* :class:`RewardBootstrap` (:class:`BootstrapConfig`, :class:`DemoGates`): reward-gated few-shot demos,
  chosen on a valset;
* :class:`ChoiceCalibration`: the offsets of the yes/no and A/B answer steps;
* :class:`ModuleSFT` (:class:`SFTStageConfig`): supervised fine-tuning of some modules' LM, on calls rebuilt
  from annotations or on the program's own successful runs;
* :class:`ModuleGRPO` (:class:`ModuleGRPOConfig`): GRPO of one module's LM on that module's reward;
* :class:`ProgressiveSchedule` (:class:`Stage`, :func:`parse_stages`): weight stages one after another
  (OPERA's MAPGRPO, QAgent's two stages).

:func:`save_compiled` / :func:`load_compiled` write and read a compiled program (JSON state plus one
safetensors folder per trained module); :func:`log_compiled_model` logs one as an MLflow pyfunc model
(:class:`CompiledProgramModel`), which ``mlflow.pyfunc.load_model`` (or :func:`load_compiled_model`, with
one-line errors for a URI that names no such model) and ``mlflow models serve`` run.
A plain ``dspy.Module`` of one's own compiles with the same names (docs/guide.md, "Your own DSPy program"):
``RewardBootstrap(metric=...)`` keeps the teacher's runs that a DSPy metric ``metric(example, prediction,
trace)`` accepts; ``ModuleSFT(metric=...)`` with ``SFTStageConfig(source="traces")`` imitates them
(``compile(..., teacher=)`` imitates a teacher program's); ``ModuleGRPO(reward=fn)`` trains on a function
``fn(question, outputs, completion) -> float``; ``load_compiled(..., program=)`` takes a fresh instance.

Imported lazily: importing this package loads neither torch nor TRL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apexdsp.optimizers.bootstrap import RewardBootstrap
    from apexdsp.optimizers.calibration import ChoiceCalibration
    from apexdsp.optimizers.compiled import load_compiled, save_compiled
    from apexdsp.optimizers.config import BootstrapConfig, DemoGates
    from apexdsp.optimizers.grpo import ModuleGRPO
    from apexdsp.optimizers.grpo_config import ModuleGRPOConfig
    from apexdsp.optimizers.mlflow_model import CompiledProgramModel, load_compiled_model, log_compiled_model
    from apexdsp.optimizers.schedule import ProgressiveSchedule, Stage, parse_stages
    from apexdsp.optimizers.sft import ModuleSFT, SFTStageConfig

_LAZY = {
    "RewardBootstrap": "apexdsp.optimizers.bootstrap",
    "BootstrapConfig": "apexdsp.optimizers.config",
    "DemoGates": "apexdsp.optimizers.config",
    "ChoiceCalibration": "apexdsp.optimizers.calibration",
    "ModuleGRPO": "apexdsp.optimizers.grpo",
    "ModuleGRPOConfig": "apexdsp.optimizers.grpo_config",
    "ModuleSFT": "apexdsp.optimizers.sft",
    "SFTStageConfig": "apexdsp.optimizers.sft",
    "ProgressiveSchedule": "apexdsp.optimizers.schedule",
    "Stage": "apexdsp.optimizers.schedule",
    "parse_stages": "apexdsp.optimizers.schedule",
    "save_compiled": "apexdsp.optimizers.compiled",
    "load_compiled": "apexdsp.optimizers.compiled",
    "CompiledProgramModel": "apexdsp.optimizers.mlflow_model",
    "log_compiled_model": "apexdsp.optimizers.mlflow_model",
    "load_compiled_model": "apexdsp.optimizers.mlflow_model",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'apexdsp.optimizers' has no attribute {name!r}")
