"""Shared fixtures: a private MLflow store per test, the shared data folder, the environment defaults."""

from __future__ import annotations

import pytest

from apexdsp.paths import configure_environment, shared_data_dir

configure_environment()


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch):
    """Every test logs to its own sqlite store (artifacts beside it), never to the project's store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch):
    """``apexdsp evaluate`` reports go to the test's folder, never to the project's ``.apexdsp/runs``."""
    folder = tmp_path / "runs"
    monkeypatch.setenv("APEXDSP_RUNS", str(folder))
    return folder


@pytest.fixture(scope="session")
def data_dir():
    """The offline benchmark copy (``../shared/data``)."""
    path = shared_data_dir()
    if not (path / "hotpotqa" / "dev.jsonl").exists():
        pytest.fail(f"shared data not found at {path}: CI expects ../shared beside the checkout")
    return path
