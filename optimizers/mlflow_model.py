"""Compiled programs as MLflow models: log one, load it anywhere apexdsp is installed, serve it over HTTP.

:func:`log_compiled_model` logs a compiled directory (see :mod:`apexdsp.optimizers.compiled`) as an MLflow
``pyfunc`` model: the directory travels as the model's ``compiled`` artifact (JSON state, manifest and any
per-module ``weights/`` folders), optionally with the index it searches as ``index``. Nothing is pickled:
the model's code is three lines that import :class:`CompiledProgramModel` from the installed apexdsp
(MLflow's "models from code"), and that class rebuilds everything on load.

``mlflow.pyfunc.load_model(uri)`` restores the program the compile saved: it sets apexdsp's environment
defaults (:func:`apexdsp.paths.configure_environment`), builds the manifest's LM (``manifest.lm``: a registry
name such as ``smollm2-135m``, a local model folder, or a LiteLLM model string), opens the index (the logged
one, else the manifest's index path) for programs that search, and loads the registry program with its
instructions, demos, trained module weights and the predictors' own LMs
(:func:`apexdsp.optimizers.compiled.load_compiled`).
``.predict(pd.DataFrame({"question": [...]}))`` (or a list of dicts with a ``question`` key; the class's
own ``predict`` also takes a list of strings) returns a DataFrame with one string ``answer`` per question,
answered one at a time, in order. The LM is set per call (``dspy.context``, with the DSPy cache off for
it), so loading a model never changes the process's DSPy settings.

MLflow checks the input example at log time: the logging process loads the model once and answers
``EXAMPLE_QUESTION`` (a failure there is only logged as an MLflow warning). Serving needs the LM where the
model is loaded: a registry name resolves on any machine, a local folder must exist at the same path.

Serve a logged or registered model with its URI (``models:/m-...``, ``models:/NAME/VERSION``, ``runs:/...``),
``MLFLOW_TRACKING_URI`` pointing at the store it was logged to::

    mlflow models serve -m URI --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"question": "Who directed Jaws?"}]}'
    # {"predictions": [{"answer": "..."}]}

The model's ``model_config`` may set ``dtype`` (``"auto"``, ``"bfloat16"`` or ``"float32"``) for a local
LM's engine; ``float32`` gives the same greedy answers however the engine batches.

:func:`load_compiled_model` is ``mlflow.pyfunc.load_model`` for these models, with a one-line
:class:`~apexdsp.errors.ApexError` for a URI that names no model in the tracking store, or a model that is not
a compiled apexdsp program, instead of MLflow's traceback; ``apexdsp ask --model URI`` uses it.
"""

from __future__ import annotations

import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd

from apexdsp.errors import ApexError

EXAMPLE_QUESTION = "When was the director of Jaws born?"
DTYPES = ("auto", "bfloat16", "float32")

# The model's code (MLflow's "models from code"): loading imports the installed class, nothing is unpickled.
MODEL_CODE = """from mlflow.models import set_model

from apexdsp.optimizers.mlflow_model import CompiledProgramModel

set_model(CompiledProgramModel())
"""


class CompiledProgramModel(mlflow.pyfunc.PythonModel):
    """An MLflow ``pyfunc`` over a compiled apexdsp program: ``question`` column in, ``answer`` column out."""

    def load_context(self, context: Any) -> None:
        from apexdsp.paths import configure_environment

        configure_environment()  # before torch, transformers or colbert import
        from apexdsp.lm.adapter import TolerantChatAdapter
        from apexdsp.optimizers.compiled import load_compiled, read_manifest
        from apexdsp.programs.registry import RETRIEVAL_FREE

        directory = context.artifacts["compiled"]
        manifest = read_manifest(directory)
        config = dict(context.model_config or {})
        self._lm = _build_lm(manifest.lm, config.get("dtype"))
        self._adapter = TolerantChatAdapter()
        retriever = None
        if manifest.program not in RETRIEVAL_FREE:
            index = context.artifacts.get("index") or (manifest.index.path if manifest.index else None)
            if index is None:
                raise ApexError(f"{directory}: program {manifest.program!r} searches an index, but none was "
                                "logged and the manifest names none")
            from apexdsp.indexes import load_retriever

            retriever = load_retriever(index)
        self.compiled = load_compiled(directory, retriever=retriever)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        answers = [str(self.answer(q).answer or "") for q in questions_of(model_input)]
        return pd.DataFrame({"answer": answers}, dtype=object)

    def answer(self, question: str) -> Any:
        """The program's whole prediction for one question (its ``answer`` and, for apexdsp's programs, the
        ``trajectory``), on the model's LM."""
        import dspy

        with dspy.context(lm=self._lm, adapter=self._adapter):
            return self.compiled.program(question=question)


def _build_lm(name: str, dtype: str | None) -> Any:
    """The manifest's LM without the DSPy cache (answers are computed, as in an evaluation)."""
    from apexdsp.lm.registry import get_lm, is_local

    if dtype is None or not is_local(name):
        return get_lm(name, cache=False)
    from apexdsp.lm.engine import EngineConfig

    return get_lm(name, engine_config=EngineConfig(dtype=dtype), cache=False)


def questions_of(model_input: Any) -> list[str]:
    """The questions of a DataFrame with a ``question`` column, a list of dicts or strings, or one string."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input if isinstance(model_input.get("question"), list)
                                   else [model_input])
    if isinstance(model_input, pd.Series):
        model_input = model_input.to_frame("question") if model_input.name != "question" else model_input.to_frame()
    if isinstance(model_input, (list, tuple)):
        if all(isinstance(item, str) for item in model_input):
            return list(model_input)
        model_input = pd.DataFrame(list(model_input))
    if not isinstance(model_input, pd.DataFrame):
        raise ApexError(f"expected a DataFrame with a 'question' column, got {type(model_input).__name__}")
    if "question" not in model_input.columns:
        raise ApexError(f"the input has no 'question' column (columns: {', '.join(map(str, model_input.columns))})")
    return ["" if _missing(q) else str(q) for q in model_input["question"].tolist()]


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(value != value)  # NaN
    except (TypeError, ValueError):
        return False


def signature() -> Any:
    """Input: a string column ``question``; output: a string column ``answer``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "question")]),
                          outputs=Schema([ColSpec("string", "answer")]))


def requirements() -> list[str]:
    """The installed apexdsp, dspy and mlflow, pinned (so MLflow does not infer them by importing)."""
    found = []
    for name in ("apexdsp", "dspy", "mlflow"):
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(name)
    return found


def load_compiled_model(model_uri: str, *, dtype: str | None = None) -> Any:
    """``mlflow.pyfunc.load_model(model_uri)`` for a model logged by :func:`log_compiled_model` (``dtype``
    overrides the one it was logged with). A URI that names no model in the tracking store, or a model that is
    not a compiled apexdsp program, is one :class:`ApexError` line naming it, before anything is loaded."""
    check_model_uri(model_uri)
    if dtype is not None and dtype not in DTYPES:
        raise ApexError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return mlflow.pyfunc.load_model(model_uri, model_config={"dtype": dtype} if dtype else None)


def check_model_uri(model_uri: str) -> None:
    """That ``model_uri`` names a compiled apexdsp program logged as an MLflow model; one line otherwise."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    try:
        info = get_model_info(model_uri)
    except (MlflowException, OSError) as error:
        reason = (getattr(error, "message", None) or str(error)).strip().splitlines()[0]
        found = "not found" if getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" else "cannot be read"
        raise ApexError(f"MLflow model {model_uri!r} {found} in the tracking store {mlflow.get_tracking_uri()} "
                        f"({reason}); give the model_uri a compile printed, or a registered version such as "
                        "models:/apexdsp-<program>/1 (`apexdsp ui` lists them), with MLFLOW_TRACKING_URI "
                        "set to the store it was logged to") from None
    if "apexdsp_program" not in (info.metadata or {}):
        raise ApexError(f"MLflow model {model_uri!r} is not a compiled apexdsp program (log one with "
                        "`apexdsp compile` or log_compiled_model)")


def log_compiled_model(directory: str | os.PathLike[str], *, name: str = "program",
                       registered_model_name: str | None = None, include_index: bool = False,
                       dtype: str | None = None) -> str:
    """Log the compiled program in ``directory`` as an MLflow pyfunc model in the active run; its model URI.

    ``registered_model_name`` also registers it (one registered model per program, a new version per call).
    ``include_index`` copies the index the program searches into the model, so that it serves without the
    compiling machine's index path. ``dtype`` sets the local LM engine's dtype when the model loads.
    The directory, its manifest, state, weights folders and index are checked first, with one-line errors.
    """
    from apexdsp.optimizers.compiled import read_manifest
    from apexdsp.programs.registry import PROGRAMS, RETRIEVAL_FREE

    folder = Path(directory).expanduser()
    manifest = read_manifest(folder)  # missing directory, not a compiled program, missing weights folder
    folder = folder.resolve()
    if manifest.program not in PROGRAMS:
        raise ApexError(f"{directory} holds {manifest.program!r}, not a registry program; only registry programs "
                        f"({', '.join(sorted(PROGRAMS))}) can be rebuilt from an MLflow model")
    if dtype is not None and dtype not in DTYPES:
        raise ApexError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    artifacts = {"compiled": str(folder)}
    if manifest.program not in RETRIEVAL_FREE:
        if manifest.index is None:
            raise ApexError(f"{directory}: program {manifest.program!r} searches an index, but the manifest "
                            "names none; recompile it with --index")
        if include_index:
            index = Path(manifest.index.path)
            if not index.is_dir():
                raise ApexError(f"{directory}: its index {index} is not there to include")
            artifacts["index"] = str(index)
    with tempfile.TemporaryDirectory(prefix="apexdsp-model-") as scratch:
        code = Path(scratch) / "compiled_program_model.py"
        code.write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(code), artifacts=artifacts, signature=signature(),
            input_example=pd.DataFrame({"question": [EXAMPLE_QUESTION]}), pip_requirements=requirements(),
            registered_model_name=registered_model_name, model_config={"dtype": dtype} if dtype else None,
            metadata={"apexdsp_program": manifest.program, "apexdsp_lm": manifest.lm})
    return info.model_uri


__all__ = ["CompiledProgramModel", "check_model_uri", "load_compiled_model", "log_compiled_model"]
