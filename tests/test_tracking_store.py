"""A new sqlite MLflow store appears complete or not at all, and a killed creation leaves nothing behind.

The kill itself is exercised by ``test_kill_and_rerun`` (``kill_long``: a tracked run killed while the store
is created); here, what a killed creation leaves (a temporary database and its journal) is laid out by
hand and the next command is checked to build a whole store and remove it.
"""

from __future__ import annotations

import sqlite3

import mlflow

from apexdsp.tracking.store import ensure_experiment, ensure_sqlite_store


def test_a_store_is_built_aside_and_what_a_killed_build_left_is_removed(tmp_path, monkeypatch):
    database = tmp_path / "store" / "mlflow.db"
    database.parent.mkdir()
    half = database.with_name(".mlflow.db.k2x9abcd.tmp")
    with sqlite3.connect(half) as connection:  # a build cut off after its first table
        connection.execute("create table experiments (experiment_id integer primary key)")
    database.with_name(".mlflow.db.k2x9abcd.tmp-journal").write_bytes(b"")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")

    experiment_id = ensure_experiment("whole")
    assert mlflow.get_experiment(experiment_id).name == "whole"
    assert sorted(p.name for p in database.parent.iterdir()) == [".mlflow.db.lock", "mlartifacts", "mlflow.db"]
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")}
    assert {"experiments", "runs", "alembic_version"} <= tables

    size = database.stat().st_size
    ensure_sqlite_store(f"sqlite:///{database}")  # a store in place is left as it is
    assert database.stat().st_size == size and ensure_experiment("whole") == experiment_id
