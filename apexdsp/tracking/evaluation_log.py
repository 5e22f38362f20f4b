"""Log an evaluation report as one MLflow run: figures as metrics, rows as a table, trajectories as JSONL."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apexdsp.tracking.run import tracked_run

EVALUATION_EXPERIMENT = "apexdsp-evaluate"


def log_evaluation(report: Any, params: Mapping[str, Any], data_files: Mapping[str, str | Path],
                   run_name: str, experiment: str = EVALUATION_EXPERIMENT) -> str:
    """Log ``report`` (an :class:`apexdsp.evaluation.EvalReport`); returns the MLflow run id."""
    with tracked_run(experiment, run_name=run_name, params=params, data_files=data_files,
                     tags={"apexdsp.kind": "evaluate"}) as run:
        run.log_metrics({k: v for k, v in report.summary().items() if v is not None})
        rows = [row.model_dump(exclude={"trajectory"}) for row in report.results]
        run.log_table(rows, "predictions.json")
        lines = "\n".join(json.dumps(row.model_dump(), ensure_ascii=False, default=str) for row in report.results)
        import mlflow

        mlflow.log_text(lines + "\n", "trajectories.jsonl")
        return run.run_id
