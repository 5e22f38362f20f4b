"""Compiled programs on disk: plain JSON state, a manifest, written atomically, checked on load.

A compiled program is a directory::

    DIR/
      apexdsp-compiled.json   the manifest (:class:`CompiledManifest`): which program with which options,
                              the LM each predictor runs on (``modules``; ``lm`` is the compile's default)
                              and the index it searches, versions, data hashes, the optimizer and its scores
      program.json            DSPy's JSON state (``module.save(path)``): per predictor its signature
                              (instructions, field prefixes) and its demos
      weights/<predictor>/    (later stages) a fine-tuned transformers folder per module, named by the
                              manifest's ``modules[<predictor>].weights``; loading gives that predictor its
                              own local LM served from the folder

No code is pickled: loading rebuilds the program from the registry (``build_program(name, **options)``) or
takes the caller's own instance, then loads the JSON state into it, and binds each predictor to the LM the
manifest names for it: a predictor that ran on an LM of its own gets that LM again, a trained one an LM over
its weights folder, and the rest run on the LM the caller configured (``manifest.lm`` is the one they were
compiled with). ``program.json`` alone is DSPy's own format: ``program.load(path)`` on a fresh instance
restores the instructions and demos, not the LMs. The directory is written next to its target under a
temporary name and renamed into place, so an interrupted save never leaves half a program where a good one
was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import dspy
from pydantic import BaseModel, Field, ValidationError

from apexdsp.errors import ApexError

MANIFEST_FILE = "apexdsp-compiled.json"
STATE_FILE = "program.json"
FORMAT = "apexdsp-compiled/1"


class ModuleBinding(BaseModel):
    """What one predictor runs on: ``lm``, a model name as ``get_lm`` takes it (for trained weights, the model
    they were trained from), and ``weights``, a folder relative to the compiled directory (stage 2+)."""

    lm: str
    weights: str | None = None


class IndexRef(BaseModel):
    """The index the program was compiled against (demos quote its passages)."""

    path: str
    corpus_sha256: str = ""
    encoder_fingerprint: str = ""
    created_at: str = ""


class DataRef(BaseModel):
    """A dataset the compile read: where from, how many examples, and a hash of what was read."""

    path: str = ""
    examples: int
    sha256: str


class CompiledManifest(BaseModel):
    format: str = FORMAT
    program: str  # registry name, or "custom:<module>.<class>" for a user's own program
    program_options: dict[str, Any] = Field(default_factory=dict)
    predictors: list[str]
    lm: str
    modules: dict[str, ModuleBinding]
    index: IndexRef | None = None
    versions: dict[str, str]
    data: dict[str, DataRef] = Field(default_factory=dict)
    optimizer: dict[str, Any] = Field(default_factory=dict)  # name, config, scores
    created_at: str = ""

    def own_lms(self) -> dict[str, str]:
        """``{predictor: LM}`` for the predictors that ran on an LM other than ``lm`` (trained ones: the model
        their weights were trained from). Empty for a manifest written before predictors' own LMs were kept."""
        return {name: binding.lm for name, binding in self.modules.items() if binding.lm != self.lm}


@dataclass
class CompiledProgram:
    program: dspy.Module
    manifest: CompiledManifest
    path: Path


def versions() -> dict[str, str]:
    found = {}
    for name in ("apexdsp", "dspy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def examples_digest(examples: Sequence[Any]) -> str:
    """A hash of what a compile read from a dataset (ids, questions, answers), in order."""
    digest = hashlib.sha256()
    for example in examples:
        get = example.get if hasattr(example, "get") else lambda key, e=example: getattr(e, key, "")
        digest.update(json.dumps([str(get("id", "")), str(get("question", "")), str(get("answer", ""))]).encode())
    return digest.hexdigest()


def index_ref(index_dir: str | os.PathLike[str] | None) -> IndexRef | None:
    """The identity of an apexdsp index directory (its manifest's corpus hash and encoder fingerprint)."""
    if index_dir is None:
        return None
    from apexdsp.indexes.manifest import IndexManifest

    manifest = IndexManifest.read(index_dir)
    return IndexRef(path=str(Path(index_dir).expanduser().resolve()), corpus_sha256=manifest.corpus_sha256,
                    encoder_fingerprint=manifest.encoder_fingerprint, created_at=manifest.created_at)


def program_identity(program: dspy.Module) -> tuple[str, dict[str, Any]]:
    """``(registry name, options)`` of an apexdsp program; ``custom:...`` and no options otherwise."""
    from apexdsp.programs.registry import PROGRAMS

    name = getattr(program, "name", None)
    config = getattr(program, "config", None)
    if name in PROGRAMS and type(program).__module__.startswith("apexdsp.programs"):
        options = config.model_dump(exclude_defaults=True) if hasattr(config, "model_dump") else {}
        return name, options
    return f"custom:{type(program).__module__}.{type(program).__qualname__}", {}


def save_compiled(program: dspy.Module, directory: str | os.PathLike[str], *, lm: str,
                  index: IndexRef | None = None, data: dict[str, DataRef] | None = None,
                  optimizer: dict[str, Any] | None = None) -> CompiledManifest:
    """Write ``program``'s state and manifest to ``directory``, replacing a compiled program there.

    Refuses to replace a directory that is not a compiled program (no manifest), so a typo in ``--out``
    cannot delete unrelated files.
    """
    from apexdsp.optimizers.trained_lm import trained_weights

    target = Path(directory).expanduser().resolve()
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST_FILE).exists())):
        raise ApexError(f"{target} exists and is not a compiled program; choose another directory")
    name, options = program_identity(program)
    predictors = [n for n, _ in program.named_predictors()]
    manifest = CompiledManifest(
        program=name, program_options=options, predictors=predictors, lm=lm,
        modules={n: ModuleBinding(lm=lm_name(p.lm, lm)) for n, p in program.named_predictors()}, index=index,
        versions=versions(),
        data=data or {}, optimizer=optimizer or {}, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    target.parent.mkdir(parents=True, exist_ok=True)
    from apexdsp.indexes.atomic import remove_abandoned

    remove_abandoned(target, hidden=True)  # what a save killed part-way left (its process is gone)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        program.save(str(staging / STATE_FILE))
        _detach_lms(staging / STATE_FILE)
        for name, source in trained_weights(program).items():  # stage 2+: the modules' own trained weights
            shutil.copytree(source, staging / "weights" / name, copy_function=_link_or_copy)
            manifest.modules[name].weights = f"weights/{name}"
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(), indent=2, default=str))
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def lm_name(lm: Any, default: str) -> str:
    """The name a manifest records for a predictor's LM: ``default`` for none (it runs on the configured LM);
    for a local LM its registry name or folder, and for trained weights the model they were trained from (the
    first that is not itself trained); for any other ``dspy.LM`` its model string."""
    if lm is None:
        return default
    from apexdsp.lm.engine import LocalEngine

    engine = getattr(lm, "engine", None)
    if not isinstance(engine, LocalEngine):
        return str(getattr(lm, "model", None) or default)
    from apexdsp.optimizers.trained_lm import is_trained
    from apexdsp.optimizers.trained_lm import read_manifest as read_trained

    folder, source = engine.model_dir, engine.source
    for _ in range(32):  # SFT then GRPO: weights trained from weights
        if not is_trained(folder):
            break
        base = read_trained(folder).get("base_model")
        if not base:
            return default
        folder, source = Path(base), None
    name = source or _local_name(folder)
    return default if _same_folder(name, default) else name


def _same_folder(name: str, default: str) -> bool:
    """Whether two local model names are one folder (``hf:/x``, ``./x`` and ``/x``)."""
    if name == default:
        return True
    folders = [Path(n.removeprefix("hf:")).expanduser() for n in (name, default)]
    return all(f.is_dir() for f in folders) and folders[0].resolve() == folders[1].resolve()


def _local_name(folder: Path) -> str:
    """The registry name of the packaged model converted into ``folder`` (``smollm2-135m``), else the name of
    a local model loaded from it, else the folder's path."""
    from apexdsp.lm.engine import shared_engines
    from apexdsp.lm.gguf_models import GGUF_MODELS, converted_dir

    resolved = folder.resolve()
    for name in GGUF_MODELS:
        if converted_dir(name).resolve() == resolved:
            return name
    for engine in shared_engines():
        if engine.model_dir.resolve() == resolved:
            return engine.source
    return str(resolved)


def _detach_lms(state_file: Path) -> None:
    """Drop the per-predictor LM settings from the saved state: a loaded program's LMs come from the
    manifest's bindings (and its weights folders), not from paths on the machine that compiled it."""
    state = json.loads(state_file.read_text())
    for value in state.values():
        if isinstance(value, dict) and value.get("lm") is not None:
            value["lm"] = None
    state_file.write_text(json.dumps(state, indent=2, default=str))


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link a weights file into the compiled directory where the filesystem allows, else copy it."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an old ``target`` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # put the good program back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: str | os.PathLike[str], *, check_versions: bool = True) -> CompiledManifest:
    """The manifest of a compiled directory; one-line errors for what is missing, foreign or stale."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise ApexError(f"compiled program {directory} not found (compile one with `apexdsp compile`)")
    source = folder / MANIFEST_FILE
    if not source.is_file():
        raise ApexError(f"{directory} has no {MANIFEST_FILE}: not a compiled program, or its save did not finish")
    try:
        manifest = CompiledManifest.model_validate_json(source.read_text())
    except (ValidationError, ValueError) as error:
        raise ApexError(f"{source}: unreadable manifest ({str(error).splitlines()[0]})") from None
    if manifest.format != FORMAT:
        raise ApexError(f"{source}: format {manifest.format!r}, this apexdsp reads {FORMAT!r}")
    if check_versions:
        current = versions()
        stale = [f"{k} {v} (installed {current.get(k)})" for k, v in manifest.versions.items()
                 if k in current and current[k] != v]
        if stale:
            raise ApexError(f"{directory} was compiled with {', '.join(stale)}; recompile it, or load it with "
                            "check_versions=False at your own risk")
    missing = [STATE_FILE] if not (folder / STATE_FILE).is_file() else []
    missing += [b.weights for b in manifest.modules.values() if b.weights and not (folder / b.weights).is_dir()]
    if missing:
        raise ApexError(f"{directory} is incomplete: missing {', '.join(missing)}")
    return manifest


def load_compiled(directory: str | os.PathLike[str], *, retriever: Any = None, program: dspy.Module | None = None,
                  check_versions: bool = True, own_lms: bool = True) -> CompiledProgram:
    """Rebuild a compiled program: the registry program named in the manifest (or ``program``, a fresh
    instance of a custom one), with the saved instructions and demos, each predictor bound to its LM.

    The caller configures the default LM (``manifest.lm`` is what it was compiled with): the predictors that
    ran on it run on the configured one. A predictor that ran on an LM of its own (``manifest.own_lms()``)
    gets that LM again, and a trained one an LM over its weights folder. ``own_lms=False`` runs every
    predictor without trained weights on the configured LM (how ``apexdsp evaluate --lm`` overrides them).
    """
    folder = Path(directory).expanduser()
    manifest = read_manifest(folder, check_versions=check_versions)
    if program is None:
        if manifest.program.startswith("custom:"):
            raise ApexError(f"{directory} holds a custom program ({manifest.program.removeprefix('custom:')}); "
                            "pass a fresh instance of it as program=")
        from apexdsp.programs.registry import build_program

        program = build_program(manifest.program, retriever=retriever, **manifest.program_options)
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except ValueError as error:
        raise ApexError(f"{folder / STATE_FILE}: not valid JSON ({error})") from None
    names = [n for n, _ in program.named_predictors()]
    saved = [k for k in state if k != "metadata"]
    if names != manifest.predictors or sorted(saved) != sorted(names):
        missing = sorted(set(manifest.predictors) - set(names))
        extra = sorted(set(names) - set(manifest.predictors))
        raise ApexError(f"{directory}: the program's modules do not match the saved state "
                        f"(saved but not in the program: {missing or 'none'}; in the program but not saved: "
                        f"{extra or 'none'}; unreadable state: {sorted(set(names) ^ set(saved)) or 'none'})")
    try:
        program.load_state({k: v for k, v in state.items() if k != "metadata"})
    except (KeyError, TypeError, ValueError) as error:
        raise ApexError(f"{folder / STATE_FILE}: state does not fit {manifest.program} ({error})") from None
    _bind_lms(program, manifest, folder, own_lms)
    program._compiled = True
    return CompiledProgram(program, manifest, folder)


def _bind_lms(program: dspy.Module, manifest: CompiledManifest, folder: Path, own_lms: bool) -> None:
    """Give each predictor the LM the manifest names for it. A local LM is built with the engine settings
    (``dtype``...) of the local LM the caller configured; a trained predictor gets its own local LM served from
    its weights folder, with the sampling and engine settings of the LM its weights were trained from (the
    configured one, or the predictor's own), as the compile gave the trained module those of that LM."""
    bindings = {name: b for name, b in manifest.modules.items() if b.weights or (own_lms and b.lm != manifest.lm)}
    if not bindings:
        return
    from apexdsp.lm.engine import LocalEngine
    from apexdsp.optimizers.trained_lm import lm_over

    configured = dspy.settings.lm if isinstance(getattr(dspy.settings.lm, "engine", None), LocalEngine) else None
    for name, predictor in program.named_predictors():
        binding = bindings.get(name)
        if binding is None:
            continue
        if not binding.weights:
            predictor.lm = _own_lm(folder, name, binding.lm, configured)
            continue
        like = configured
        if own_lms and binding.lm != manifest.lm:  # trained from an LM of its own: that LM's settings
            try:
                like = _own_lm(folder, name, binding.lm, configured)
            except ApexError:  # not on this machine: the weights are all the module needs
                pass
        weights = (folder / binding.weights).resolve()
        predictor.lm = lm_over(weights, like) if like is not None else _own_lm(folder, name, str(weights), None)


def _own_lm(directory: Path, name: str, model: str, like: Any) -> Any:
    """The LM ``model`` for predictor ``name``, a local one with the engine settings of ``like``; an LM that
    cannot be built is one line naming the predictor and the model."""
    from apexdsp.lm.registry import get_lm, is_local

    config = getattr(getattr(like, "engine", None), "config", None) if is_local(model) else None
    try:
        return get_lm(model, engine_config=config)
    except ApexError as error:
        raise ApexError(f"{directory}: module {name} runs on {model}, which cannot be loaded here ({error})") from None


__all__ = ["CompiledManifest", "CompiledProgram", "DataRef", "IndexRef", "ModuleBinding", "examples_digest",
           "index_ref", "lm_name", "load_compiled", "read_manifest", "save_compiled"]
