"""The vanilla baseline end to end: real SmolLM2, real questions, a real MLflow run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow

APEXDSP = str(Path(sys.executable).parent / "apexdsp")


def test_vanilla_evaluate_prints_figures_and_logs_the_run(data_dir, isolated_mlflow, isolated_runs, tmp_path):
    result = subprocess.run(
        [APEXDSP, "evaluate", "--program", "vanilla", "--questions", str(data_dir / "hotpotqa" / "dev.jsonl"),
         "--limit", "4", "--threads", "4", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n"] == 4
    assert 0.0 <= summary["em"] <= summary["f1"] + 1e-9 <= 1.0 + 1e-9
    assert summary["seconds_per_question"] > 0
    assert summary["lm_calls"] == 1.0  # one Predict per question, no cache
    assert summary["tokens"] > 0
    # Where the time went: the LM worker computed for part of the wall time, four questions shared its steps.
    assert 0.0 < summary["lm_busy_share"] <= 1.0 and 0.0 < summary["lm_prefill_share"] < 1.0
    assert summary["lm_rows_per_step"] > 1.0 and 0.0 <= summary["lm_prefix_reused"] < 1.0

    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["program"] == "vanilla"
    assert run.data.params["questions_sha256"]
    assert run.data.metrics["n"] == 4
    assert run.data.metrics["lm_busy_share"] == summary["lm_busy_share"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"predictions.json", "trajectories.jsonl"} <= artifacts
    assert Path(summary["results_file"]).parent == isolated_runs  # the test's folder, not the project's
    rows = json.loads(Path(summary["results_file"]).read_text())["results"]
    assert len(rows) == 4 and all(isinstance(r["prediction"], str) for r in rows)
    assert any(r["prediction"] for r in rows), "the model answered nothing at all"


def test_trace_flag_records_mlflow_traces_of_each_question(data_dir, isolated_mlflow):
    result = subprocess.run(
        [APEXDSP, "evaluate", "--program", "vanilla", "--questions", str(data_dir / "hotpotqa" / "dev.jsonl"),
         "--limit", "2", "--threads", "2", "--trace", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    experiment = mlflow.get_experiment_by_name("apexdsp-evaluate")
    traces = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list")
    assert len(traces) == 2
    assert "question" in traces[0].info.request_preview
