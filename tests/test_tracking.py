"""Runs land in a real sqlite MLflow store with provenance, metrics and artifacts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import matplotlib
import mlflow
import pytest

from apexdsp.tracking import file_sha256, tracked_run, write_json_atomic
from apexdsp.tracking.store import artifact_root

matplotlib.use("Agg")


def test_tracked_run_logs_params_metrics_and_artifacts(tmp_path, isolated_mlflow):
    data = tmp_path / "q.jsonl"
    data.write_text('{"id": "1"}\n')
    with tracked_run("t-exp", run_name="r", params={"program": "vanilla", "config": {"k": [1, 2]}},
                     data_files={"questions": data}) as run:
        run.log_metrics({"em": 0.25, "bad": float("nan"), "label": "x"})
        for step in range(3):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        run.log_json({"a": 1}, "report.json")
        run.log_table([{"id": "1", "em": 1.0, "trajectory": {"q": 1}}], "predictions.json")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots()
        axis.plot([0, 1])
        run.log_figure(figure, "curve.png")
        run_id = run.run_id

    finished = mlflow.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.metrics == {"em": 0.25, "loss": pytest.approx(1 / 3)}
    assert finished.data.params["program"] == "vanilla"
    assert json.loads(finished.data.params["config"]) == {"k": [1, 2]}
    assert finished.data.params["questions_sha256"] == file_sha256(data)[:16]
    assert "git_commit" in finished.data.params
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"report.json", "predictions.json", "curve.png"} <= artifacts
    # artifacts live beside the sqlite file, not in the working directory
    assert (artifact_root(isolated_mlflow) / "t-exp").exists()


def test_failed_body_marks_run_failed():
    with pytest.raises(RuntimeError):
        with tracked_run("t-exp", run_name="boom") as run:
            run_id = run.run_id
            raise RuntimeError("boom")
    assert mlflow.get_run(run_id).info.status == "FAILED"


def test_write_json_atomic_replaces_whole_file(tmp_path):
    target = tmp_path / "out" / "r.json"
    write_json_atomic({"n": 1}, target)
    write_json_atomic({"n": 2}, target)
    assert json.loads(target.read_text()) == {"n": 2}
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]



def test_a_run_left_running_by_a_killed_process_is_ended_by_the_next_run_beside_it(isolated_mlflow):
    """A real process opens a run and a nested one and is SIGKILLed inside them; the next top-level run of the
    experiment ends both as KILLED. A live process's run, and a run an ``apexdsp run`` ledger resumes, stay."""
    script = textwrap.dedent("""
        import os, signal
        from apexdsp.tracking import tracked_run
        with tracked_run("orphans", run_name="killed") as run, tracked_run("orphans", nested=True) as child:
            print(os.getpid(), run.run_id, child.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    dead_pid, parent_id, child_id = killed.stdout.split()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("orphans").experiment_id
    here = socket.gethostname()
    live = client.create_run(experiment, tags={"apexdsp.host": here, "apexdsp.pid": str(os.getpid())})
    ledger = client.create_run(experiment, tags={"apexdsp.host": here, "apexdsp.pid": dead_pid,
                                                 "apexdsp.ledger": "a1b2"})
    runs = (parent_id, child_id, live.info.run_id, ledger.info.run_id)
    assert {client.get_run(r).info.status for r in runs} == {"RUNNING"}
    with tracked_run("orphans", run_name="next") as run:
        assert client.get_run(run.run_id).data.tags["apexdsp.pid"] == str(os.getpid())
    assert [client.get_run(r).info.status for r in runs] == ["KILLED", "KILLED", "RUNNING", "RUNNING"]
