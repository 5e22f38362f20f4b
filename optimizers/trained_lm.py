"""The LM behind one module: can its weights be trained, where do trained weights go, and how a module
starts using them.

Weight-level stages (GRPO, SFT) train the transformers folder that a module's local ``dspy.LM`` serves
(:class:`apexdsp.lm.engine.LocalEngine`), then give that module — and only that module — a new
``dspy.LM`` over the trained folder, built by the same registry call any local folder goes through
(:func:`apexdsp.lm.registry.get_lm`). Other modules keep the LM they had, so training modules one at a
time (MAPGRPO) never disturbs the ones trained before.

Trained weights are written to a staging folder and renamed into place only when complete, so a crash
never leaves a half-written folder where a good one was; ``apexdsp-trained.json`` inside says what was
trained from what, and its presence marks the folder finished. It also records a digest of everything
the training depended on (:func:`settings_digest`): weights are reused only by a stage with the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import dspy

from apexdsp.errors import ApexError

logger = logging.getLogger(__name__)

TRAINED_MANIFEST = "apexdsp-trained.json"
SETTINGS_DIGEST = "settings_digest"  # the manifest's field
# Settings of a stage config that change how training is kept or watched, not what it learns.
BOOKKEEPING_SETTINGS = frozenset({"resume", "keep_checkpoints", "save_steps", "save_total_limit", "logging_steps",
                                  "zero_std_warning", "num_threads"})


class ModelNotTrainable(ApexError):
    """A module whose LM has no local weights to train (a remote API model, a non-LM object)."""


def module_lm(predictor: dspy.Predict) -> Any:
    """The LM a predictor calls: its own, else the configured default."""
    lm = predictor.lm or dspy.settings.lm
    if lm is None:
        raise ApexError("no LM is configured: call apexdsp.runtime.configure_dspy(...) before compiling")
    return lm


def trainable_model_dir(lm: Any, module: str) -> Path:
    """The transformers folder behind ``lm``; :class:`ModelNotTrainable` when it has none.

    Only an LM served in-process by :class:`~apexdsp.lm.engine.LocalEngine` has weights this process can
    update; an API model (``openai/...``, ``hosted_vllm/...``) does not, and training it must fail before
    any slow work, naming the module and the model.
    """
    from apexdsp.lm.engine import LocalEngine

    engine = getattr(lm, "engine", None)
    if not isinstance(engine, LocalEngine):
        model = getattr(lm, "model", type(lm).__name__)
        raise ModelNotTrainable(
            f"module {module!r} uses LM {model!r}, which is served remotely: its weights cannot be trained here; "
            "give the module a local model (smollm2-135m or a transformers folder) with "
            "dspy.configure(lm=apexdsp.lm.registry.get_lm(...)) or predictor.lm = ...")
    if not (engine.model_dir / "config.json").is_file():
        raise ModelNotTrainable(f"module {module!r}: {engine.model_dir} is not a transformers model folder")
    return engine.model_dir


def weights_dir(out_dir: str | Path, name: str) -> Path:
    """``<out>/weights/<name>/``: where the trained weights of module (or stage) ``name`` live."""
    return Path(out_dir) / "weights" / name


def is_trained(folder: Path) -> bool:
    """Whether ``folder`` holds finished trained weights (its manifest was written last)."""
    return (folder / TRAINED_MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAINED_MANIFEST).read_text(encoding="utf-8"))


def settings_digest(config: Any, **parts: Any) -> str:
    """A digest of what a stage's training depends on: its config (a dataclass, bookkeeping fields left
    out) and ``parts`` (module names, the base model's :func:`model_identity`, the training data...).

    Records, examples and dataclasses count by their content; any other object by its type's name."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in BOOKKEEPING_SETTINGS}
    text = json.dumps({"config": settings, **parts}, sort_keys=True, default=_content)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _content(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # a pydantic record
        return value.model_dump(mode="json")
    if hasattr(value, "toDict"):  # a dspy.Example
        return value.toDict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(map(str, value))
    return type(value).__qualname__  # stable across processes, unlike repr's address


def model_identity(model_dir: Path) -> str:
    """What a base model is for :func:`settings_digest`: trained weights by their own digest (so a stage
    trained again changes the stages trained from it), any other model folder by its path."""
    if is_trained(model_dir):
        return read_manifest(model_dir).get(SETTINGS_DIGEST) or str(model_dir)
    return str(model_dir)


def reusable_weights(target: Path, digest: str) -> bool:
    """Whether ``target`` holds finished weights trained under ``digest`` (see :func:`settings_digest`).

    Weights trained with other settings, or saved without a digest, are not reused: the stage trains again
    into place, and says so."""
    if not is_trained(target):
        return False
    try:
        recorded = read_manifest(target).get(SETTINGS_DIGEST)
    except ValueError:
        recorded = None
    if recorded != digest:
        logger.warning("trained weights in %s were trained with other settings (digest %s, now %s): training "
                       "again into place", target, recorded or "not recorded", digest)
        return False
    remove_stale_saves(target)
    return True


def save_trained_weights(model: Any, tokenizer: Any, target: Path, manifest: dict[str, Any]) -> Path:
    """Save ``model`` (a PEFT model is merged first) as safetensors with its tokenizer, atomically.

    Written to a temporary folder beside ``target`` and renamed over it when complete; the old folder,
    if any, is removed only after the new one is in place. What a killed save of ``target`` left beside
    it is removed first (:func:`remove_stale_saves`).
    """
    if hasattr(model, "merge_and_unload"):  # LoRA: the module's LM serves plain merged weights
        model = model.merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_saves(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / TRAINED_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        staging.chmod(0o755)
        previous = None
        if target.exists():
            previous = target.with_name(f".{target.name}.old")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(target, previous)
        os.replace(staging, target)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def remove_stale_saves(target: Path) -> list[str]:
    """Remove the staging folders (``.<name>-XXXXXXXX``, :func:`tempfile.mkdtemp`'s eight characters) and
    the replaced folder (``.<name>.old``) that a killed save of ``target`` leaves; returns their names.
    Another name's folders are left alone, even one that starts like this one (``reader`` and ``reader-x``)."""
    stale = re.compile(rf"\.{re.escape(target.name)}(-[a-z0-9_]{{8}}|\.old)")
    removed = []
    for path in target.parent.iterdir() if target.parent.is_dir() else []:
        if stale.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def lm_over(folder: Path, like: Any) -> Any:
    """A new local ``dspy.LM`` over ``folder`` with the sampling settings (and engine settings) of ``like``."""
    from apexdsp.lm.registry import get_lm

    engine = getattr(like, "engine", None)
    kwargs = dict(getattr(like, "kwargs", {}) or {})
    return get_lm(str(folder), engine_config=getattr(engine, "config", None), **kwargs)


def use_trained_lm(predictors: list[dspy.Predict], folder: Path, like: Any) -> Any:
    """Point each predictor at one new LM over ``folder`` (they share its engine); returns the LM."""
    lm = lm_over(folder, like)
    for predictor in predictors:
        predictor.lm = lm
    return lm


def copy_program(student: dspy.Module) -> dspy.Module:
    """A deep copy of ``student`` (prompts, demos) whose predictors share the student's LM objects.

    An LM holding a local engine (weights, a worker thread, locks) must not be deep-copied: the copy
    would load a second model, or fail. The LMs are detached for the copy and re-attached to both.
    """
    predictors = [p for _, p in student.named_predictors()]
    lms = [p.lm for p in predictors]
    for predictor in predictors:
        predictor.lm = None
    try:
        program = student.deepcopy()
    finally:
        for predictor, lm in zip(predictors, lms):
            predictor.lm = lm
    for (_, predictor), lm in zip(program.named_predictors(), lms, strict=True):
        predictor.lm = lm
    return program


def trained_weights(program: dspy.Module) -> dict[str, Path]:
    """``{predictor name: trained weights folder}`` for every predictor whose LM serves trained weights
    (what a compiled-program save records next to the prompts)."""
    found: dict[str, Path] = {}
    for name, predictor in program.named_predictors():
        engine = getattr(predictor.lm, "engine", None)
        folder = getattr(engine, "model_dir", None)
        if folder is not None and is_trained(Path(folder)):
            found[name] = Path(folder)
    return found


__all__ = ["ModelNotTrainable", "SETTINGS_DIGEST", "TRAINED_MANIFEST", "copy_program", "is_trained", "lm_over",
           "model_identity", "module_lm", "read_manifest", "remove_stale_saves", "reusable_weights",
           "save_trained_weights", "settings_digest", "trainable_model_dir", "trained_weights", "use_trained_lm",
           "weights_dir"]
