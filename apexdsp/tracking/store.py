"""Where runs go: a local sqlite MLflow store by default, any tracking server by ``MLFLOW_TRACKING_URI``.

The default keeps the database and artifacts together in the project cache (``.apexdsp/mlflow.db`` and
``.apexdsp/mlartifacts``), so ``mlflow ui --backend-store-uri sqlite:///.apexdsp/mlflow.db`` shows them.
A new sqlite store appears complete or not at all (:func:`ensure_sqlite_store`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from apexdsp.errors import ApexError
from apexdsp.paths import cache_dir, home


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def artifact_root(uri: str | None = None) -> Path:
    """Where experiments created on a sqlite store keep their artifacts: beside the database file."""
    uri = uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        root.mkdir(parents=True, exist_ok=True)
        return root
    return cache_dir("mlartifacts")


class TrackingUnavailable(ApexError):
    """The MLflow tracking server cannot be reached; computed results stay in the local cache."""


def probe_tracking(uri: str, advice: str = "") -> None:
    """Fail fast when a tracking server does not answer.

    MLflow's own client retries a refused connection with exponential backoff for minutes before it gives
    up; one ``/health`` request with a short timeout says the same in a second.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as error:
        raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable ({type(error).__name__})"
                                  + (f"; {advice}" if advice else "")) from None


def configure_tracking() -> str:
    """Point MLflow at the project's store (creating a sqlite one if needed); returns the URI in use."""
    import mlflow

    uri = default_tracking_uri()
    ensure_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_sqlite_store(uri: str) -> None:
    """Create the sqlite store at ``uri`` if there is none yet, so that it appears complete or not at all.

    MLflow builds a new store in place (its tables, then a chain of schema migrations: seconds), and a
    process killed part-way leaves a database that every later open fails on ("table ... already exists").
    Here it is built under a temporary name in the same folder and renamed into place once complete, under
    a lock beside it (``.<name>.lock``) so that two processes never build it at once; temporaries a killed
    build left are removed by the next one.
    """
    if not uri.startswith("sqlite:///"):
        return
    database = Path(uri.removeprefix("sqlite:///"))
    if database.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from apexdsp.locks import held_lock

    database.parent.mkdir(parents=True, exist_ok=True)
    with held_lock(database.with_name(f".{database.name}.lock")):
        if database.exists():  # another process built it while this one waited
            return
        for leftover in database.parent.glob(f".{database.name}.*.tmp*"):  # and its -journal
            leftover.unlink(missing_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{database.name}.", suffix=".tmp", dir=database.parent)
        os.close(handle)
        try:
            quiet_mlflow_logs()
            store = SqlAlchemyStore(f"sqlite:///{name}", artifact_root(uri).as_uri())
            store.engine.dispose()  # closed: no journal is left beside it
            os.replace(name, database)
        finally:
            Path(name).unlink(missing_ok=True)


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, creating it (with a project-local artifact location) if needed."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = configure_tracking()
    quiet_mlflow_logs()
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if uri.startswith("sqlite:"):
            location = (artifact_root(uri) / name).as_uri()
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as error:
        raise ApexError(f"MLflow tracking store {uri} is not usable: {error.message}") from error


def quiet_mlflow_logs() -> None:
    """MLflow logs every schema migration of a new sqlite store at INFO; keep the console for results."""
    import logging

    for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
