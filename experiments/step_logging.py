"""What the runner logs into a finished step's MLflow run: its params, figures, curves and artifacts, and for
a compile step the compiled program as an MLflow model, as ``apexdsp compile`` logs its own.

The model (:func:`apexdsp.optimizers.mlflow_model.log_compiled_model`) is registered as ``apexdsp-<program>``,
a version per compile step, and its URI is the run's tag ``apexdsp.model_uri``. A program that searches a
BM25 index built in memory from a corpus file cannot be rebuilt from a model (the manifest names no index
folder): its run says so in the tag ``apexdsp.model`` instead. Logged once per step, whether the step was
computed now or earlier without tracking (``apexdsp run --log-only``).
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Any

from apexdsp.experiments.steps import RESULT_FILE

NOT_A_MODEL = ("not logged as a model: it searches a BM25 index built from a corpus file, which a model cannot "
               "carry (a ColBERT index can)")


def metric_name(text: str) -> str:
    """MLflow metric keys allow letters, digits, ``_ - . / :`` and spaces."""
    return re.sub(r"[^\w\-./: ]", "_", text)


def log_step_result(kind: str, label: str, key: str, result: dict[str, Any], work_dir: Path, console: Any) -> None:
    """Params, figures, curves and artifacts of a finished step (its ``result.json``), into the active run."""
    import mlflow

    from apexdsp.tracking.run import TrackedRun

    run = TrackedRun(mlflow.active_run())
    run.log_params({**result["params"], "step_key": key, "step_seconds": round(result["seconds"], 2)})
    run.log_metrics({metric_name(k): v for k, v in result["metrics"].items()})
    for name, points in result.get("history", {}).items():
        for index, value in points:
            run.log_metrics({metric_name(name): value}, step=int(index))
    for artifact in result["artifacts"]:
        path = work_dir / artifact
        if path.exists():
            run.log_artifact(path, artifact_path=artifact if path.is_dir() else None)
    run.log_artifact(work_dir / RESULT_FILE)
    if kind == "compile":
        log_program_model(work_dir / "program", label, console)


def log_program_model(folder: Path, label: str, console: Any) -> str | None:
    """Log the compiled program in ``folder`` as an MLflow model of the active run; its URI (``None``, and
    the reason as the run's tag, for a program that searches a BM25 index built from a corpus file)."""
    import mlflow

    from apexdsp.optimizers.compiled import read_manifest
    from apexdsp.optimizers.mlflow_model import log_compiled_model
    from apexdsp.programs.registry import RETRIEVAL_FREE

    manifest = read_manifest(folder)
    if manifest.program not in RETRIEVAL_FREE and manifest.index is None:
        mlflow.set_tag("apexdsp.model", NOT_A_MODEL)
        console.print(f"[dim]{label} (compile): the compiled program is {NOT_A_MODEL}[/]")
        return None
    with contextlib.redirect_stdout(sys.stderr):  # MLflow checks the input example by answering it
        uri = log_compiled_model(folder, registered_model_name=f"apexdsp-{manifest.program}")
    mlflow.set_tag("apexdsp.model_uri", uri)
    return uri


__all__ = ["NOT_A_MODEL", "log_program_model", "log_step_result", "metric_name"]
