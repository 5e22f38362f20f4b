"""Against a real ``mlflow server`` (sqlite backend, loopback port): run a tiny experiment with the console
script, check through MLflow's REST API that the parent and child runs, params, metrics and artifacts are
there, read them back with ``apexdsp compare``; and a server that is down is a clear error that loses nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from experiment_fixtures import write_tiny_experiment

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
    else:
        process.terminate()
        pytest.fail("mlflow server did not answer /health within 90 s")
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


def apexdsp(*args: str, uri: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "APEXDSP_HOME": str(Path.cwd() / ".apexdsp")}
    return subprocess.run([str(BIN / "apexdsp"), *args], capture_output=True, text=True, timeout=600, env=env,
                          cwd=cwd)


def rest(url: str, endpoint: str, body: dict | None = None, params: dict | None = None) -> dict:
    call = requests.post if body is not None else requests.get
    response = call(f"{url}/api/2.0/mlflow/{endpoint}", json=body, params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def test_experiment_runs_params_metrics_and_artifacts_are_on_the_server(server, tmp_path, data_dir):
    spec = write_tiny_experiment(tmp_path / "spec", data_dir, name="served-rag", experiment="served")
    result = apexdsp("run", str(spec), "--cache-dir", str(tmp_path / "cache"), "--json", uri=server, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    parent_id = summary["parent_run_id"]

    experiment = rest(server, "experiments/get-by-name", params={"experiment_name": "served"})["experiment"]
    runs = rest(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    by_id = {run["info"]["run_id"]: run for run in runs}
    tags = {rid: {t["key"]: t["value"] for t in run["data"].get("tags", [])} for rid, run in by_id.items()}
    assert tags[parent_id]["apexdsp.kind"] == "experiment"
    children = [rid for rid, t in tags.items() if t.get("mlflow.parentRunId") == parent_id]
    assert sorted(tags[c]["apexdsp.step"] + ":" + tags[c]["apexdsp.label"] for c in children) == [
        "compile:labeled", "evaluate:labeled", "evaluate:uncompiled"]
    for child in children:
        run = by_id[child]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
        artifacts = {f["path"] for f in rest(server, "artifacts/list", params={"run_id": child}).get("files", [])}
        assert params["step_key"] == tags[child]["apexdsp.step_key"] and "result.json" in artifacts
        if tags[child]["apexdsp.step"] == "evaluate":
            assert params["program"] == "rag" and params["n"] == "2"
            assert {"em", "f1", "hit"} <= set(metrics) and "report.json" in artifacts
        else:
            assert metrics["demos_per_module"] == 2 and "program" in artifacts
    parent_params = {p["key"]: p["value"] for p in by_id[parent_id]["data"]["params"]}
    assert parent_params["stages"] == "labeled" and parent_params["index"] == "bm25"

    compared = apexdsp("compare", "--experiment", "served", "--metric", "em,f1,hit", "--json",
                       "--out", str(tmp_path / "plots"), uri=server, cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr[-3000:]
    table = json.loads(compared.stdout)
    assert sorted((row["program"], row["stage"]) for row in table["runs"]) == [("rag", "labeled"),
                                                                             ("rag", "uncompiled")]
    evaluations = {c: by_id[c] for c in children if tags[c]["apexdsp.step"] == "evaluate"}
    for row in table["runs"]:
        served = {m["key"]: m["value"] for m in evaluations[row["run_id"]]["data"]["metrics"]}
        assert row["metrics"]["f1"] == pytest.approx(served["f1"])
    plots = rest(server, "artifacts/list", params={"run_id": table["compare_run_id"], "path": "plots"})
    assert "plots/metrics_by_program_stage.png" in {f["path"] for f in plots["files"]}
    assert (tmp_path / "plots" / "metrics_by_program_stage.png").stat().st_size > 5000

    by_parent = apexdsp("compare", parent_id, "--json", "--no-plots", uri=server, cwd=tmp_path)
    assert {row["run_id"] for row in json.loads(by_parent.stdout)["runs"]} == set(evaluations)


def test_a_server_that_is_down_is_a_clear_error_and_results_are_logged_later(server, tmp_path, data_dir):
    spec = write_tiny_experiment(tmp_path / "spec", data_dir, name="late-rag", experiment="late")
    cache = str(tmp_path / "cache")
    down = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    refused = apexdsp("run", str(spec), "--cache-dir", cache, uri=down, cwd=tmp_path)
    assert refused.returncode == 2 and time.time() - started < 60
    assert f"MLflow tracking server {down} is unreachable" in refused.stderr and "Traceback" not in refused.stderr
    assert "--no-track" in refused.stderr and not list((tmp_path / "cache").glob("evaluate-*"))

    offline = apexdsp("run", str(spec), "--cache-dir", cache, "--no-track", "--json", uri=down, cwd=tmp_path)
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert [s["status"] for s in json.loads(offline.stdout)["steps"]] == ["computed"] * 3

    later = apexdsp("run", str(spec), "--cache-dir", cache, "--log-only", "--json", uri=server, cwd=tmp_path)
    assert later.returncode == 0, later.stderr[-3000:]
    assert [s["status"] for s in json.loads(later.stdout)["steps"]] == ["cached"] * 3
    compared = apexdsp("compare", "--experiment", "late", "--json", "--no-plots", uri=server, cwd=tmp_path)
    assert len(json.loads(compared.stdout)["runs"]) == 2

    started = time.time()
    compare_down = apexdsp("compare", "--experiment", "late", "--no-plots", uri=down, cwd=tmp_path)
    assert compare_down.returncode == 2 and "Traceback" not in compare_down.stderr, compare_down.stderr[-2000:]
    # MLflow's client alone would retry the refused connection for minutes
    assert f"MLflow tracking server {down} is unreachable" in compare_down.stderr and time.time() - started < 60
