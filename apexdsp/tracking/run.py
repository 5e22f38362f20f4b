"""One MLflow run per evaluation, compile or index job, with the project's provenance attached.

``tracked_run`` is the only way apexdsp code talks to MLflow, so every run carries the same params
(git commit, library versions, data hashes) and artifacts land in the same place.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from apexdsp.tracking.orphans import end_orphaned_runs, owner_tags
from apexdsp.tracking.provenance import data_file_params, git_commit, library_versions
from apexdsp.tracking.store import ensure_experiment

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value is 6000 characters
COMPILE_EXPERIMENT = "apexdsp-compile"  # where compile runs go unless nested in a run of another experiment


class TrackedRun:
    """A thin handle on an active MLflow run: metrics, JSON/table artifacts and figures."""

    def __init__(self, run: Any):
        self._run = run

    @property
    def run_id(self) -> str:
        return self._run.info.run_id

    @property
    def experiment_id(self) -> str:
        return self._run.info.experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.log_params({key: _param_value(value) for key, value in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite numeric metrics; NaN/inf and non-numbers are skipped rather than failing the run."""
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if _is_finite_number(v)}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_json(self, obj: Any, artifact_file: str) -> None:
        import mlflow

        mlflow.log_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str), artifact_file)

    def log_table(self, rows: list[Mapping[str, Any]], artifact_file: str) -> None:
        """A table (list of row dicts) as an MLflow table artifact, viewable in the UI's artifact tab."""
        import mlflow

        if not rows:
            return
        columns: dict[str, list[Any]] = {key: [] for key in rows[0]}
        for row in rows:
            for key in columns:
                value = row.get(key)
                columns[key].append(value if isinstance(value, (str, int, float, bool)) or value is None
                                    else json.dumps(value, ensure_ascii=False, default=str))
        mlflow.log_table(columns, artifact_file=artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        import mlflow

        mlflow.log_figure(figure, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})


class UntrackedRun(TrackedRun):
    """What :func:`tracked_run` yields while tracking is off: the same calls, and nothing is sent to MLflow
    (the callers write their results to local files first, so nothing is lost)."""

    def __init__(self) -> None:
        super().__init__(None)

    @property
    def run_id(self) -> None:  # type: ignore[override]
        return None

    @property
    def experiment_id(self) -> None:  # type: ignore[override]
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_json(self, obj: Any, artifact_file: str) -> None:
        pass

    def log_table(self, rows: list[Mapping[str, Any]], artifact_file: str) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass


_tracking_off = False


@contextlib.contextmanager
def tracking_disabled(disabled: bool = True) -> Iterator[None]:
    """Within this block (``disabled``), :func:`tracked_run` opens no MLflow run and touches no store: what
    ``--no-track`` and a spec's ``track = false`` mean for every stage of a command."""
    global _tracking_off
    previous, _tracking_off = _tracking_off, _tracking_off or disabled
    try:
        yield
    finally:
        _tracking_off = previous


def disable_tracking() -> None:
    """Turn tracking off for the rest of this process (a command run with ``--no-track``)."""
    global _tracking_off
    _tracking_off = True


def tracking_enabled() -> bool:
    return not _tracking_off


def run_active() -> bool:
    """Whether an MLflow run is active in this thread (a stage opened inside it nests its run there)."""
    if _tracking_off:
        return False
    import mlflow

    return mlflow.active_run() is not None


@contextlib.contextmanager
def tracked_run(
    experiment: str,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    data_files: Mapping[str, str | Path] | list[str | Path] | None = None,
    tags: Mapping[str, Any] | None = None,
    nested: bool = False,
) -> Iterator[TrackedRun]:
    """Start an MLflow run in ``experiment`` with provenance params; end it FAILED if the body raises.

    The run records the host and process that opened it; a top-level run first ends as KILLED the runs of
    its experiment that a killed process left RUNNING (:mod:`apexdsp.tracking.orphans`).

    ``data_files`` is ``{role: path}`` (or a list, roles ``data_0``...) and logs each path and its hash.
    A ``nested`` run opened while a run is active is its child and lives in the parent's experiment (the
    MLflow UI shows a run's children only within one experiment); ``experiment`` is for a top-level run.
    """
    if _tracking_off:
        yield UntrackedRun()
        return
    import mlflow

    parent = mlflow.active_run() if nested else None
    experiment_id = parent.info.experiment_id if parent is not None else ensure_experiment(experiment)
    if parent is None:  # a top-level run: first end those that killed processes left RUNNING beside it
        end_orphaned_runs(experiment_id)
    if isinstance(data_files, list):
        data_files = {f"data_{i}": path for i, path in enumerate(data_files)}
    # ``tags`` are written with the run itself: a run never exists without them, even if the process dies
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, nested=nested,
                          tags={**owner_tags(), **{k: str(v) for k, v in (tags or {}).items()}}) as active:
        run = TrackedRun(active)
        run.set_tags({"git_commit": git_commit(), **{f"version.{k}": v for k, v in library_versions().items()}})
        all_params = dict(params or {})
        if data_files:
            all_params.update(data_file_params(data_files))
        all_params.setdefault("git_commit", git_commit())
        if all_params:
            run.log_params(all_params)
        yield run


def flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one param per leaf, keys joined by dots (``gates.min_answer_f1``): the MLflow UI
    compares runs param by param."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and value:
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``: readers never see half a file."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False, encoding="utf-8") as handle:
        handle.write(text)
        tmp = handle.name
    os.replace(tmp, path)
    return path


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    """Write JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text[:MAX_PARAM_LENGTH]


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
